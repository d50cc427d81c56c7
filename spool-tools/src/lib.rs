//! spool-tools
