//! Control plane: who may use it ([`auth`]), deploy checks ([`archive`],
//! [`multipart`], [`handler`], [`settings`]), the request handling thread ([`plane`]),
//! and the Lambda service API ([`lambda`], its asynchronous side in
//! [`lambda_event`], signed with [`sigv4`]).
pub mod archive;
pub mod auth;
pub mod handler;
pub mod lambda;
pub mod lambda_event;
pub mod multipart;
pub mod plane;
pub mod settings;
pub mod sigv4;

pub use plane::Control;
