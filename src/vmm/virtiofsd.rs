//! One virtiofsd per share.
