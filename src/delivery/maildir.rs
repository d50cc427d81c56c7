//! Maildir delivery (placeholder; being written).
