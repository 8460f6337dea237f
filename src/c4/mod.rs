pub mod json;
pub mod persist;
