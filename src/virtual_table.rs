//! sendmail's virtusertable (placeholder; being written).
