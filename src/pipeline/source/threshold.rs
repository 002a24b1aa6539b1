//! Threshold crossings on continuous voltage, for every source that sends it (Open Ephys,
//! LSL): a robust noise estimate per channel from its first samples, then negative-going
//! crossings of `-threshold * sd`, at most one per refractory period.

/// "No crossing yet": far enough in the past for any refractory period.
pub const NEVER: i64 = i64::MIN / 4;

/// The robust noise sd of a channel: median(|x|) / 0.6745 (Quiroga et al. 2004). Reorders
/// `x` (in place, no allocation).
pub fn robust_sd(x: &mut [f32]) -> f32 {
    if x.is_empty() {
        return 0.0;
    }
    for v in x.iter_mut() {
        *v = v.abs();
    }
    let n = x.len();
    let (below, mid, _) = x.select_nth_unstable_by(n / 2, f32::total_cmp);
    let mid = *mid;
    let median = if n % 2 == 1 { mid } else { (below.iter().copied().fold(f32::MIN, f32::max) + mid) / 2.0 };
    median / 0.6745
}

/// One channel's samples as a source delivers them, read without copying: float32 LE
/// bytes (Open Ephys) or one channel of an interleaved block (LSL).
pub trait Samples {
    fn len(&self) -> usize;
    fn at(&self, i: usize) -> f32;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// float32 little-endian bytes.
#[derive(Clone, Copy)]
pub struct LeBytes<'a>(pub &'a [u8]);

impl Samples for LeBytes<'_> {
    fn len(&self) -> usize {
        self.0.len() / 4
    }
    fn at(&self, i: usize) -> f32 {
        let b = &self.0[4 * i..4 * i + 4];
        f32::from_le_bytes([b[0], b[1], b[2], b[3]])
    }
}

/// Channel `channel` of `frames` interleaved frames of `stride` values each.
#[derive(Clone, Copy)]
pub struct Strided<'a> {
    pub data: &'a [f32],
    pub channel: usize,
    pub stride: usize,
}

impl Samples for Strided<'_> {
    fn len(&self) -> usize {
        self.data.len() / self.stride
    }
    fn at(&self, i: usize) -> f32 {
        self.data[i * self.stride + self.channel]
    }
}

/// Samples `from..to` of another view.
pub struct Range<'a, S: Samples> {
    pub inner: &'a S,
    pub from: usize,
    pub to: usize,
}

impl<S: Samples> Samples for Range<'_, S> {
    fn len(&self) -> usize {
        self.to - self.from
    }
    fn at(&self, i: usize) -> f32 {
        self.inner.at(self.from + i)
    }
}

/// One channel's detector.
pub struct Detector {
    prev: f32,
    have_prev: bool,
    /// Sample number of the last counted crossing.
    last_cross: i64,
    /// Warm-up samples (capacity = the warm-up length; freed once estimated).
    noise: Vec<f32>,
    sd: Option<f32>,
    /// -threshold * sd.
    level: f32,
}

impl Default for Detector {
    fn default() -> Self {
        Detector { prev: 0.0, have_prev: false, last_cross: NEVER, noise: Vec::new(), sd: None, level: 0.0 }
    }
}

impl Detector {
    /// The noise sd, once estimated.
    pub fn sd(&self) -> Option<f32> {
        self.sd
    }
    /// The next samples do not follow the last ones (a gap): no crossing across it.
    pub fn break_continuity(&mut self) {
        self.have_prev = false;
    }
    /// The stream started over: continuity and the refractory clock are reset (the noise
    /// estimate is kept).
    pub fn restart(&mut self) {
        self.have_prev = false;
        self.last_cross = NEVER;
    }
    /// Room for the warm-up, so that the per-sample path does not allocate.
    pub fn reserve(&mut self, noise_len: usize) {
        if self.sd.is_none() {
            self.noise.reserve_exact(noise_len);
        }
    }

    /// Runs the detector over samples whose first is sample number `t0`; returns the
    /// crossings. Samples go to the noise estimate while it is not made yet.
    pub fn process(&mut self, x: &impl Samples, t0: i64, refractory: i64, noise_len: usize, threshold: f32) -> u32 {
        let mut k = 0;
        for i in 0..x.len() {
            let v = x.at(i);
            if self.sd.is_some() {
                let t = t0 + i as i64;
                if self.have_prev && self.prev >= self.level && v < self.level && t - self.last_cross >= refractory {
                    self.last_cross = t;
                    k += 1;
                }
            } else {
                self.noise.push(v);
                if self.noise.len() >= noise_len {
                    let sd = robust_sd(&mut self.noise);
                    self.sd = Some(sd);
                    self.level = -threshold * sd;
                    self.noise = Vec::new();
                }
            }
            self.prev = v;
            self.have_prev = true;
        }
        k
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn robust_sd_is_median_abs_over_0_6745() {
        let mut x = vec![1.0, -2.0, 3.0, -4.0, 5.0];
        assert!((robust_sd(&mut x) - 3.0 / 0.6745).abs() < 1e-6);
        let mut x = vec![1.0, -2.0, 3.0, -4.0];
        assert!((robust_sd(&mut x) - 2.5 / 0.6745).abs() < 1e-6);
        assert_eq!(robust_sd(&mut []), 0.0);
    }

    #[test]
    fn views_read_the_same_samples() {
        let v = [1.5f32, -2.0, 3.25];
        let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
        let inter = [9.0f32, 1.5, 9.0, -2.0, 9.0, 3.25];
        let (a, b) = (LeBytes(&bytes), Strided { data: &inter, channel: 1, stride: 2 });
        assert_eq!((a.len(), b.len()), (3, 3));
        assert!((0..3).all(|i| a.at(i) == v[i] && b.at(i) == v[i]));
        let r = Range { inner: &a, from: 1, to: 3 };
        assert_eq!((r.len(), r.at(0), r.at(1)), (2, -2.0, 3.25));
    }
}
