//! What several test binaries share.

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
