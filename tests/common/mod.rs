//! What several test binaries share (each uses some of it).
#![allow(dead_code)]

use std::path::PathBuf;

use parallax::engine::{Degrees, Devices, LayoutChoice, Placement};
use parallax::runtime::{EngineSpec, Runtime, RuntimeOptions};

/// The runtime on the demo model over two CPU worker ranks (ring 2), images to `gallery`.
pub fn two_rank_runtime(gallery: PathBuf) -> Runtime {
    Runtime::start(RuntimeOptions {
        engine: EngineSpec::new(
            "demo",
            Placement {
                devices: Devices::parse("cpu:2").expect("devices"),
                layout: LayoutChoice::Degrees(Degrees {
                    ring: Some(2),
                    ..Degrees::default()
                }),
            },
        ),
        gallery_dir: Some(gallery),
        notify: None,
    })
    .expect("runtime starts")
}

/// A free TCP rendezvous address on this machine (for `parallax worker --init`).
pub fn free_init() -> String {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("free port")
        .local_addr()
        .expect("addr")
        .port();
    format!("tcp://127.0.0.1:{port}")
}
