//! The cache policies (First Block Cache, DBCache, TaylorSeer, MagCache) on the trained demo
//! model: each is exact at its "off" setting, DBCache with one probe block and no corrector is
//! First Block Cache, and each reuses steps at its "balanced" preset while staying close to the
//! uncached image. (Under sequence and data parallelism: `src/parallel/ranks.rs` and
//! `tests/runtime.rs`.)

use candle_core::Device;
use parallax::pipeline::cache::CacheSpec;
use parallax::pipeline::{metrics, GenerateRequest, Generated, Pipeline};

fn request(cache: &str) -> GenerateRequest {
    GenerateRequest {
        prompt: "two small yellow stars above a green square, night sky".into(),
        width: 256,
        height: 256,
        steps: Some(12),
        seed: 4,
        cache: Some(cache.parse().expect("spec")),
        ..Default::default()
    }
}

fn run(p: &Pipeline, cache: &str) -> Generated {
    p.generate(&request(cache), &mut |_| Ok(())).expect(cache)
}

fn pattern(g: &Generated) -> String {
    g.stats
        .steps
        .iter()
        .map(|k| if k.is_reused() { 'R' } else { 'C' })
        .collect()
}

#[test]
fn every_policy_is_exact_when_off_and_dbcache_contains_first_block_cache() {
    let p = Pipeline::demo(&Device::Cpu).expect("demo");
    let reference = run(&p, "none");
    for off in [
        "fbcache:t=0",
        "dbcache:f=2,b=1,t=0,taylor=2",
        "taylorseer:n=1,order=2",
        "magcache:t=0",
    ] {
        let g = run(&p, off);
        assert!(
            off.parse::<CacheSpec>().expect("spec").is_off(),
            "{off} says it is off"
        );
        assert_eq!(g.stats.reused, 0, "{off}");
        assert!(
            g.image == reference.image,
            "{off}: the image differs from no cache"
        );
    }
    // DBCache with one probe block, no corrector, no warm-up, limit or Taylor term takes First
    // Block Cache's decisions and draws its image.
    for t in [0.12, 0.2] {
        let fb = run(&p, &format!("fbcache:t={t}"));
        let db = run(&p, &format!("dbcache:f=1,b=0,t={t}"));
        assert!(fb.stats.reused > 0, "fbcache {t} reuses on the demo");
        assert_eq!(pattern(&db), pattern(&fb), "threshold {t}");
        assert!(
            db.image == fb.image,
            "threshold {t}: DBCache(1, 0) is First Block Cache"
        );
    }
}

#[test]
fn every_policy_reuses_steps_at_its_balanced_preset_and_stays_close() {
    let p = Pipeline::demo(&Device::Cpu).expect("demo");
    let reference = run(&p, "none");
    for policy in ["fbcache", "dbcache", "taylorseer", "magcache"] {
        let spec = CacheSpec::preset(policy, "balanced").expect("preset");
        let g = run(&p, &spec.to_string());
        let q = metrics::quality(&g.image, &reference.image).expect("quality");
        assert!(
            g.stats.reused >= 2,
            "{spec}: {} of 12 steps reused ({})",
            g.stats.reused,
            pattern(&g)
        );
        assert!(q.psnr_db > 30.0, "{spec}: PSNR {:.1} dB", q.psnr_db);
        assert_eq!(
            g.settings.cache_spec(),
            spec,
            "the PNG settings name the policy"
        );
    }
}
