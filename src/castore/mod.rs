//! The content-addressed store (tvix/snix castore format, BLAKE3).
