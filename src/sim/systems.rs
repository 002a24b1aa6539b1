//! The latent systems: three chaotic flows integrated with RK4 substeps, and a linear-Gaussian
//! system stepped exactly.
//!
//! States are f64 `[f64; 4]` for every system (the flows use the first three): the
//! trajectories are chaotic, so f32 integration would make a rig's output depend on rounding
//! details within a few hundred bins, and the cost (3 dims, 40 evaluations a bin) is nothing.

use std::fmt;
use std::str::FromStr;

pub type State = [f64; 4];

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum System {
    Lorenz,
    Arneodo,
    Rossler,
    Linear,
}

impl System {
    pub const ALL: [System; 4] = [System::Lorenz, System::Arneodo, System::Rossler, System::Linear];

    pub fn name(self) -> &'static str {
        match self {
            System::Lorenz => "lorenz",
            System::Arneodo => "arneodo",
            System::Rossler => "rossler",
            System::Linear => "linear",
        }
    }

    pub fn latent_dims(self) -> usize {
        match self {
            System::Linear => 4,
            _ => 3,
        }
    }

    /// System time advanced per bin (the seed-002 settings); `None` for the linear system,
    /// which is defined per bin.
    pub fn time_per_bin(self) -> Option<f64> {
        match self {
            System::Lorenz => Some(0.015008),
            System::Arneodo => Some(0.0904),
            System::Rossler => Some(0.1688),
            System::Linear => None,
        }
    }

    /// The flow's reflection symmetry as per-coordinate signs: the mirror image of a
    /// trajectory is a trajectory, so the invariant measure is symmetric and moments odd in
    /// the flipped coordinates vanish exactly. Lorenz: (x, y, z) -> (-x, -y, z); Arneodo:
    /// (x, y, z) -> (-x, -y, -z); Rossler has none.
    pub fn mirror(self) -> Option<[f64; 3]> {
        match self {
            System::Lorenz => Some([-1.0, -1.0, 1.0]),
            System::Arneodo => Some([-1.0, -1.0, -1.0]),
            System::Rossler | System::Linear => None,
        }
    }

    /// A point in the attractor's basin that reference trajectories start near.
    pub(crate) fn canonical_start(self) -> State {
        match self {
            System::Lorenz => [-8.0, 7.0, 27.0, 0.0],
            System::Arneodo => [0.5, 0.0, 0.0, 0.0],
            System::Rossler => [1.0, 1.0, 0.0, 0.0],
            System::Linear => [0.0; 4],
        }
    }
}

impl fmt::Display for System {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for System {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        System::ALL.into_iter().find(|sys| sys.name().eq_ignore_ascii_case(s.trim())).ok_or_else(|| {
            let names: Vec<&str> = System::ALL.iter().map(|s| s.name()).collect();
            format!("unknown system '{s}' (expected one of: {})", names.join(", "))
        })
    }
}

/// RK4 substeps per bin: at most 0.017 system time units per substep (Rossler), where
/// RK4's local error is far below f32 output precision.
pub const SUBSTEPS: usize = 10;

fn lorenz(x: &State) -> State {
    const SIGMA: f64 = 10.0;
    const RHO: f64 = 28.0;
    const BETA: f64 = 8.0 / 3.0;
    [SIGMA * (x[1] - x[0]), x[0] * (RHO - x[2]) - x[1], x[0] * x[1] - BETA * x[2], 0.0]
}

fn arneodo(x: &State) -> State {
    const A: f64 = -5.5;
    const B: f64 = 4.5;
    const C: f64 = 1.0;
    const D: f64 = -1.0;
    [x[1], x[2], -A * x[0] - B * x[1] - C * x[2] + D * x[0] * x[0] * x[0], 0.0]
}

fn rossler(x: &State) -> State {
    const A: f64 = 0.2;
    const B: f64 = 0.2;
    const C: f64 = 5.7;
    [-x[1] - x[2], x[0] + A * x[1], B + x[2] * (x[0] - C), 0.0]
}

fn axpy(x: &State, h: f64, k: &State) -> State {
    [x[0] + h * k[0], x[1] + h * k[1], x[2] + h * k[2], x[3] + h * k[3]]
}

/// Advances a flow by one bin (`SUBSTEPS` classic RK4 steps).
pub fn flow_bin(system: System, x: &mut State) {
    let f = match system {
        System::Lorenz => lorenz,
        System::Arneodo => arneodo,
        System::Rossler => rossler,
        System::Linear => return,
    };
    let h = system.time_per_bin().unwrap_or(0.0) / SUBSTEPS as f64;
    for _ in 0..SUBSTEPS {
        let k1 = f(x);
        let k2 = f(&axpy(x, 0.5 * h, &k1));
        let k3 = f(&axpy(x, 0.5 * h, &k2));
        let k4 = f(&axpy(x, h, &k3));
        for i in 0..4 {
            x[i] += h / 6.0 * (k1[i] + 2.0 * k2[i] + 2.0 * k3[i] + k4[i]);
        }
    }
}

/// The linear system: two damped rotations, x_{t+1} = A x_t + sqrt(1 - rho^2) e_t with
/// e_t ~ N(0, I). A scaled rotation keeps the stationary covariance isotropic, so with that
/// noise it is exactly I: each dimension has stationary mean 0 and variance 1.
/// Periods 40 and 12 bins (0.8 s and 0.24 s at 20 ms bins), memories 50 and 20 bins.
pub const LINEAR_BLOCKS: [(f64, f64); 2] = [(0.98, 40.0), (0.95, 12.0)];

pub fn linear_bin(x: &mut State, noise: &[f32; 4]) {
    for (b, &(rho, period)) in LINEAR_BLOCKS.iter().enumerate() {
        let (s, c) = (2.0 * std::f64::consts::PI / period).sin_cos();
        let (x0, x1) = (x[2 * b], x[2 * b + 1]);
        let sd = (1.0 - rho * rho).sqrt();
        x[2 * b] = rho * (c * x0 - s * x1) + sd * noise[2 * b] as f64;
        x[2 * b + 1] = rho * (s * x0 + c * x1) + sd * noise[2 * b + 1] as f64;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for s in System::ALL {
            assert_eq!(s.to_string().parse::<System>(), Ok(s));
        }
        assert_eq!("Lorenz".parse::<System>(), Ok(System::Lorenz));
        let e = "lorentz".parse::<System>().unwrap_err();
        assert!(e.contains("'lorentz'") && e.contains("lorenz, arneodo, rossler, linear"), "{e}");
    }

    /// RK4 is 4th order: halving the step shrinks the error 16-fold (checked against a
    /// much finer solution over one bin of Lorenz time).
    #[test]
    fn rk4_converges_at_fourth_order() {
        let x0: State = [-8.0, 7.0, 27.0, 0.0];
        let solve = |n: usize, t: f64| {
            let mut x = x0;
            let h = t / n as f64;
            for _ in 0..n {
                let k1 = lorenz(&x);
                let k2 = lorenz(&axpy(&x, 0.5 * h, &k1));
                let k3 = lorenz(&axpy(&x, 0.5 * h, &k2));
                let k4 = lorenz(&axpy(&x, h, &k3));
                for i in 0..3 {
                    x[i] += h / 6.0 * (k1[i] + 2.0 * k2[i] + 2.0 * k3[i] + k4[i]);
                }
            }
            x
        };
        let t = 0.5;
        let exact = solve(20_000, t);
        let err = |n| {
            let x = solve(n, t);
            (0..3).map(|i| (x[i] - exact[i]).abs()).fold(0.0, f64::max)
        };
        let ratio = err(200) / err(400);
        assert!((14.0..18.5).contains(&ratio), "error ratio {ratio}");
        // And the production step (0.0015 time units) is accurate to ~1e-9 per bin.
        let mut x = x0;
        flow_bin(System::Lorenz, &mut x);
        let fine = solve(2_000, System::Lorenz.time_per_bin().unwrap());
        assert!((0..3).all(|i| (x[i] - fine[i]).abs() < 1e-8), "{x:?} vs {fine:?}");
    }
}
