//! Flow-matching timesteps.
//!
//! Time runs from 1 (pure noise) to 0 (image). FLUX.1-dev shifts the schedule towards the noisy
//! end by an amount that grows with the number of image tokens: `mu` is interpolated linearly from
//! 0.5 at 256 tokens to 1.15 at 4096 tokens (extrapolated beyond), and each time becomes
//! `e^mu / (e^mu + (1/t - 1))`. FLUX.1-schnell uses the plain linear schedule.

/// Shift parameter `mu` for an image of `image_seq_len` tokens (2x2 latent patches).
pub fn mu_for_seq_len(image_seq_len: usize) -> f64 {
    const X1: f64 = 256.0;
    const Y1: f64 = 0.5;
    const X2: f64 = 4096.0;
    const Y2: f64 = 1.15;
    let m = (Y2 - Y1) / (X2 - X1);
    let b = Y1 - m * X1;
    m * image_seq_len as f64 + b
}

/// The exponential time shift with strength `mu` (sigma = 1).
pub fn time_shift(mu: f64, t: f64) -> f64 {
    if t <= 0.0 {
        return 0.0;
    }
    if t >= 1.0 {
        return 1.0;
    }
    let e = mu.exp();
    e / (e + (1.0 / t - 1.0))
}

/// `steps + 1` times from 1 down to 0; shifted for `image_seq_len` tokens when `shift` is set.
pub fn timesteps(steps: usize, image_seq_len: usize, shift: bool) -> Vec<f64> {
    let mu = mu_for_seq_len(image_seq_len);
    (0..=steps)
        .map(|i| {
            let t = 1.0 - i as f64 / steps as f64;
            if shift {
                time_shift(mu, t)
            } else {
                t
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mu_endpoints() {
        assert!((mu_for_seq_len(256) - 0.5).abs() < 1e-12);
        assert!((mu_for_seq_len(4096) - 1.15).abs() < 1e-12);
        // 1024x1024 -> 64x64 patches = 4096 tokens; 512x512 -> 1024 tokens.
        assert!((mu_for_seq_len(1024) - (0.5 + 0.65 * 768.0 / 3840.0)).abs() < 1e-12);
    }

    #[test]
    fn schnell_is_linear() {
        let ts = timesteps(4, 4096, false);
        assert_eq!(ts, vec![1.0, 0.75, 0.5, 0.25, 0.0]);
    }

    #[test]
    fn dev_schedule_values() {
        let ts = timesteps(4, 4096, true);
        assert_eq!(ts.len(), 5);
        assert_eq!(ts[0], 1.0);
        assert_eq!(ts[4], 0.0);
        // t = 0.5 -> e^1.15 / (e^1.15 + 1) = 0.759510...
        let e = 1.15f64.exp();
        assert!((ts[2] - e / (e + 1.0)).abs() < 1e-12);
        assert!((ts[2] - 0.759_510_916).abs() < 1e-6);
        // t = 0.75 -> e^mu / (e^mu + 1/3)
        assert!((ts[1] - e / (e + 1.0 / 3.0)).abs() < 1e-12);
        // Monotone decreasing, and shifted towards noise (above the linear schedule).
        for i in 1..4 {
            assert!(ts[i] < ts[i - 1]);
            assert!(ts[i] > 1.0 - i as f64 / 4.0);
        }
    }
}
