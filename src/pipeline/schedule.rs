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

/// FLUX.2's shift strength for `image_seq_len` tokens and `steps` steps (diffusers'
/// `compute_empirical_mu`): beyond 4300 tokens a line in the token count alone, below it a line
/// in the step count between the fits at 10 and at 200 steps.
pub fn flux2_mu(image_seq_len: usize, steps: usize) -> f64 {
    let (a1, b1) = (8.73809524e-05, 1.89833333);
    let (a2, b2) = (0.00016927, 0.45666666);
    let n = image_seq_len as f64;
    if image_seq_len > 4300 {
        return a2 * n + b2;
    }
    let (m200, m10) = (a2 * n + b2, a1 * n + b1);
    let a = (m200 - m10) / 190.0;
    a * steps as f64 + (m200 - 200.0 * a)
}

/// FLUX.2's `steps + 1` times (klein, distilled or Base): `1, ..., 1/steps` shifted by
/// [`flux2_mu`], then 0.
pub fn flux2_timesteps(steps: usize, image_seq_len: usize) -> Vec<f64> {
    let mu = flux2_mu(image_seq_len, steps);
    (0..steps)
        .map(|i| time_shift(mu, 1.0 - i as f64 / steps as f64))
        .chain(std::iter::once(0.0))
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

    #[test]
    fn flux2_schedule_values() {
        // mu meets its two fits at 10 and 200 steps, and is the 200-step fit past 4300 tokens.
        let n = 1024.0;
        assert!((flux2_mu(1024, 200) - (0.00016927 * n + 0.45666666)).abs() < 1e-9);
        assert!((flux2_mu(1024, 10) - (8.73809524e-05 * n + 1.89833333)).abs() < 1e-9);
        assert_eq!(flux2_mu(5000, 4), flux2_mu(5000, 50));
        let ts = flux2_timesteps(4, 1024);
        assert_eq!((ts.len(), ts[0], ts[4]), (5, 1.0, 0.0));
        let e = flux2_mu(1024, 4).exp();
        assert!((ts[3] - e / (e + 3.0)).abs() < 1e-12);
    }
}
