//! Guest
