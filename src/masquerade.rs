//! Sender masquerading (placeholder; being written).
