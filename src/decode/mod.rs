//! Decoding one or a few tokens at a time: the key/value cache, and where tokens
//! are (rotary embeddings, ALiBi slopes, relative position buckets, padding masks).

pub(crate) mod cache;
pub(crate) mod paged;
pub(crate) mod position;
pub(crate) mod rope;
