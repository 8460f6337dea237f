//! luadriver: runs Control4 DriverWorks-style Lua drivers outside a controller.

pub mod broker;
pub mod mqtt;
