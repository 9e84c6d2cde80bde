//! GHASH (placeholder: being implemented).
