//! kiln: a gRPC build executor that runs every build in a fresh microVM.
//!
//! Where a request goes, in order:
//! - [`proto`]: the wire layer (tvix/snix build and castore, kiln's events).
//! - [`server`]: one tonic server carrying every service.
//! - [`build`]: validates a request into the domain type, then the executor
//!   plans the VM, materialises inputs, boots, streams, collects and ingests.
//! - [`vmm`]: VMM backends (QEMU microvm, cloud-hypervisor) and virtiofsd.
//! - [`guest_image`]: kernel artifacts and the initramfs (agent + job).
//! - [`castore`]: the content-addressed store the inputs come from and the
//!   outputs go to.

#![warn(missing_docs)]

pub mod castore;
pub mod proto;
pub mod vmm;
