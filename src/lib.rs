//! luadriver: runs Control4 DriverWorks-style Lua drivers outside a controller.

pub mod c4;
pub mod mqtt;
pub mod package;
