//! luadriver: runs Control4 DriverWorks-style Lua drivers outside a controller.

pub mod broker;
pub mod c4;
pub mod cli;
pub mod driver;
pub mod mqtt;
pub mod package;
