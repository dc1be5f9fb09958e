//! The CPU engine: the reference every GPU kernel is checked against, and a real engine for small
//! runs. One file per op family; `cuda/<family>.cu` and `src/gpu/<family>.rs` are the twins.

pub mod backei_layer;
pub mod conv;
pub mod dropout;
pub mod linear;
pub mod loss;
pub mod network;
pub mod neuron;
pub mod pool;
pub mod scratch;
