//! Shadow decoders (`[[decoder]]`) in the real binary on loopback ZeroMQ: a pyzmq client
//! subscribes to each shadow's own socket; a shadow with the driving decoder's model and
//! seed publishes exactly the driver's outputs; every shadow answers every bin the driver
//! decoded, with the same gaps and restarts; each shadow's session replays identically;
//! a shadow that does not fit the run is refused before start, naming the line.

mod common;

use common::rig::*;
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};

/// Subscribes to every endpoint of argv[3:], prints "ready" once each handshake is done,
/// reads N from stdin, then receives until every endpoint has N outputs (or 20 s) and
/// writes them to argv[2] as {endpoint: [output, ...]}.
const SUBSCRIBER: &str = r#"
import json, sys, time
import zmq, zmq.utils.monitor
sys.path.insert(0, sys.argv[1])
from latentloop import wire as w
ctx = zmq.Context()
eps = sys.argv[3:]
subs, mons = {}, {}
for ep in eps:
    s = ctx.socket(zmq.SUB)
    s.setsockopt(zmq.SUBSCRIBE, b"")
    s.setsockopt(zmq.RCVHWM, 1000000)
    mons[ep] = s.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED)
    s.connect(ep)
    subs[ep] = s
for ep, m in mons.items():
    if not m.poll(20000):
        sys.exit(f"no handshake with {ep}")
    zmq.utils.monitor.recv_monitor_message(m)
    subs[ep].disable_monitor()
    m.close(0)
time.sleep(0.3)
print("ready", flush=True)
got = {ep: [] for ep in eps}
poller = zmq.Poller()
for s in subs.values():
    poller.register(s, zmq.POLLIN)
want = None
t_end = None
while True:
    if want is None:
        import select
        if select.select([sys.stdin], [], [], 0)[0]:
            want = int(sys.stdin.readline())
            t_end = time.monotonic() + 20
    elif all(len(v) >= want for v in got.values()) or time.monotonic() > t_end:
        break
    for s, _ in poller.poll(20):
        ep = next(e for e, x in subs.items() if x is s)
        o = w.decode_output(s.recv())
        got[ep].append({k: (v.tolist() if hasattr(v, "tolist") else v) for k, v in o.items()})
json.dump(got, open(sys.argv[2], "w"))
"#;

fn replay(dir: &std::path::Path) -> (Option<i32>, String) {
    let out = Command::new(common::bin()).arg("replay").arg(dir).arg("--quiet").output().unwrap();
    (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
fn shadow_decoders_answer_every_bin_on_their_own_sockets_and_replay_identically() {
    let Some(rig) = Rig::new("shadow", ModelKind::Xfads(4)) else { return };
    let kalman = rig.dir.join("kalman.safetensors");
    latentloop(&["fit", "kalman", "--data", s(&rig.data), "--out", s(&kalman)]);
    let (twin_ep, kalman_ep) = (endpoint(&rig.dir, "twin"), endpoint(&rig.dir, "kalman"));
    let extra = format!(
        "[[decoder]]\nname = \"twin\"\nmodel = \"model.safetensors\"\noutput = \"{twin_ep}\"\nsamples = 16\n\n\
         [[decoder]]\nname = \"kalman\"\nmodel = \"kalman.safetensors\"\noutput = \"{kalman_ep}\"\n"
    );
    rig.write_config(Cfg { bin_ms: 1.0, extra: &extra, ..Default::default() });

    let sub_py = rig.dir.join("subscriber.py");
    let got_path = rig.dir.join("shadows.json");
    std::fs::write(&sub_py, SUBSCRIBER).unwrap();
    let mut ll = rig.start();
    let mut sub = Guard(
        Command::new(&rig.py)
            .args([s(&sub_py), s(&python_dir()), s(&got_path), &twin_ep, &kalman_ep])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let mut ready = String::new();
    BufReader::new(sub.0.stdout.take().unwrap()).read_line(&mut ready).unwrap();
    assert_eq!(ready.trim(), "ready", "{}", ll.stop());

    // A gap, a refused NaN frame and a publisher restart: the shadows see what the driver saw.
    let mut steps = stream(0, 0..60);
    steps.extend((65..90).map(|k| bin(k, k as usize)));
    steps.push(json!({"seq": 90, "row": 90, "bad": "nan"}));
    steps.extend((91..120).map(|k| bin(k, k as usize)));
    steps.extend(stream(0, 120..160));
    let res = rig.drive(json!({ "steps": steps }), |_| {});
    let outs = outputs(&res);
    writeln!(sub.0.stdin.take().unwrap(), "{}", outs.len()).unwrap();
    assert!(sub.0.wait().unwrap().success());
    let log = ll.stop();
    let got: Value = serde_json::from_str(&std::fs::read_to_string(&got_path).unwrap()).unwrap();

    // The twin: the driver's model and seed, so the driver's outputs, bit for bit.
    let twin = got[&twin_ep].as_array().unwrap();
    assert_eq!(twin.len(), outs.len(), "{log}");
    for (t, o) in twin.iter().zip(&outs) {
        assert_eq!(t["seq"].as_u64(), Some(o.seq));
        assert_eq!(t["flags"].as_u64(), Some(o.flags as u64), "seq {}", o.seq);
        assert_eq!(t["dropped_before"].as_u64(), Some(o.dropped), "seq {}", o.seq);
        assert_eq!(t["recv_ns"].as_u64(), Some(o.recv_ns), "seq {}", o.seq);
        for (k, v) in [("behavior", &o.behavior), ("latent", &o.latent), ("lag1", &o.lag1)] {
            let t: Vec<f64> = t[k].as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect();
            assert_eq!(&t, v, "{k} of seq {}", o.seq);
        }
        assert!(t["publish_ns"].as_u64().unwrap() >= o.publish_ns, "a shadow publishes after the driver");
    }
    // The Kalman shadow: every bin, the same gap and restart flags.
    let kal = got[&kalman_ep].as_array().unwrap();
    assert_eq!(kal.iter().map(|o| o["seq"].as_u64().unwrap()).collect::<Vec<_>>(), seqs(&outs));
    for (k, o) in kal.iter().zip(&outs) {
        let mask = latentloop::wire::output::FLAG_GAP
            | latentloop::wire::output::FLAG_RESTART
            | latentloop::wire::output::FLAG_REJECTED;
        assert_eq!(k["flags"].as_u64().unwrap() as u16 & mask, o.flags & mask, "seq {}", o.seq);
        assert_eq!(k["behavior"].as_array().unwrap().len(), o.behavior.len());
    }

    let sum = rig.summary();
    let shadows = sum["shadows"].as_array().unwrap();
    assert_eq!(shadows.len(), 2);
    for (sh, name) in shadows.iter().zip(["twin", "kalman"]) {
        assert_eq!(sh["name"], name);
        assert_eq!(sh["decoded"].as_u64(), Some(outs.len() as u64), "{sh}");
        assert_eq!(sh["feed_lost"], 0);
        assert_eq!(sh["missing"].as_u64(), Some(5), "the gap of 5 bins: {sh}");
        assert_eq!(sh["restarts"].as_u64(), Some(1), "{sh}");
        let dir = std::path::PathBuf::from(sh["session"].as_str().unwrap());
        assert_eq!(dir, rig.session().join("shadows").join(name));
        assert!(std::path::Path::new(sh["reports"].as_str().unwrap())
            .join("latency-receive_to_publish.hgrm")
            .is_file());
        let (code, err) = replay(&dir);
        assert_eq!(code, Some(0), "{err}");
        assert!(err.contains(&format!("{} bins, all identical", outs.len())), "{name}: {err}");
    }
    // The driving decoder's own session is untouched by its shadows.
    rig.assert_replays_identically();
}

#[test]
fn a_shadow_that_does_not_fit_the_run_is_refused_before_start() {
    let Some(rig) = Rig::new("shadow-refused", ModelKind::Xfads(4)) else { return };
    let other = rig.dir.join("other.safetensors");
    small_random_model(&other, 4, CHANNELS + 1, &["--dt", "0.001"]);
    let slow = rig.dir.join("slow.safetensors");
    small_random_model(&slow, 4, CHANNELS, &["--dt", "0.02"]);
    let ep = endpoint(&rig.dir, "shadow");
    for (model, output, said) in [
        ("other.safetensors", ep.as_str(), format!("reads {} channels, the bins have {CHANNELS}", CHANNELS + 1)),
        ("slow.safetensors", ep.as_str(), "was made for 20 ms bins, the run bins at 1 ms".to_string()),
        ("model.safetensors", rig.out_ep.as_str(), "the driving decoder's [output] endpoint".to_string()),
    ] {
        let extra = format!("[[decoder]]\nname = \"b\"\nmodel = \"{model}\"\noutput = \"{output}\"\n");
        rig.write_config(Cfg { bin_ms: 1.0, extra: &extra, ..Default::default() });
        let out = latentloop_status(&["run", s(&rig.config), "--quiet", "--seconds", "1"]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{err}");
        assert!(err.contains(&said) && err.contains("[[decoder]] 'b'") && err.contains("line "), "{err}");
        assert!(!rig.reports().join("summary.json").exists(), "nothing ran");
    }
}

fn latentloop_status(args: &[&str]) -> std::process::Output {
    Command::new(common::bin()).args(args).output().unwrap()
}
