//! Test-only providers for the runner's own tests.
#![allow(dead_code)]

pub mod broken;
