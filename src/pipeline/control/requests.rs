//! The control requests: one JSON object with a `"cmd"` key each (docs/CONTROL.md). Parsing
//! is strict: an unknown command, an unknown key, a missing or badly typed value is refused
//! with a reason that names it.

use super::adapt::AdaptConfig;
use serde::Deserialize;
use serde_json::Value;

#[derive(Debug, Deserialize, PartialEq)]
#[serde(tag = "cmd", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// Counters, model, latency so far, R^2, calibration and adaptation state.
    Status,
    /// Outputs flagged PAUSED from the next bin (the decoder keeps filtering).
    Pause,
    Resume,
    /// The filter starts over from its prior at the next bin.
    Reset,
    /// A clean stop, with reports (like Ctrl-C).
    Stop,
    /// Swap in a model file at a bin boundary.
    LoadModel {
        path: String,
        /// Carry the state over where the latent spaces match (else start from the prior).
        #[serde(default = "yes")]
        carry_state: bool,
    },
    /// Treat these channels as missing from the next bin ([] unmasks).
    Mask {
        channels: Vec<usize>,
    },
    /// A labelled mark, stored with the bin it arrived at.
    Event {
        label: String,
        #[serde(default)]
        payload: Option<Value>,
    },
    /// Refit the Kalman decoder on the last `seconds` of received bins and their behaviour.
    Calibrate {
        #[serde(default)]
        seconds: Option<f64>,
        #[serde(default)]
        ridge: Option<f64>,
    },
    /// Start (or stop, with mode "off") continuous adaptation.
    Adapt(AdaptConfig),
}

fn yes() -> bool {
    true
}

impl Request {
    /// Parses one request; the error says what was wrong with it.
    pub fn parse(v: &Value) -> Result<Request, String> {
        let Some(o) = v.as_object() else {
            return Err(format!("a request is a JSON object with a \"cmd\" key, not {}", kind_of(v)));
        };
        match o.get("cmd") {
            None => return Err("the request has no \"cmd\" key".into()),
            Some(Value::String(_)) => {}
            Some(other) => return Err(format!("\"cmd\" must be a string, not {}", kind_of(other))),
        }
        // serde's deny_unknown_fields does not reach the commands without arguments.
        let cmd = o["cmd"].as_str().unwrap_or_default();
        if ["status", "pause", "resume", "reset", "stop"].contains(&cmd) {
            if let Some(k) = o.keys().find(|k| *k != "cmd") {
                return Err(format!("\"{cmd}\": unknown field `{k}`: {cmd} takes no arguments"));
            }
        }
        let r: Request = serde_json::from_value(v.clone()).map_err(|e| format!("{}: {e}", o["cmd"]))?;
        r.validate()?;
        Ok(r)
    }

    fn validate(&self) -> Result<(), String> {
        let positive = |name: &str, v: Option<f64>| match v {
            Some(x) if !(x.is_finite() && x > 0.0) => Err(format!("{name} must be a positive number, not {x}")),
            _ => Ok(()),
        };
        match self {
            Request::Calibrate { seconds, ridge } => {
                positive("seconds", *seconds)?;
                match ridge {
                    Some(r) if !(r.is_finite() && *r >= 0.0) => Err(format!("ridge must be >= 0, not {r}")),
                    _ => Ok(()),
                }
            }
            Request::Event { label, .. } if label.trim().is_empty() => Err("the event's label is empty".into()),
            Request::Adapt(c) => c.validate(),
            _ => Ok(()),
        }
    }
}

fn kind_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn err(v: Value) -> String {
        Request::parse(&v).unwrap_err()
    }

    #[test]
    fn requests_parse_and_bad_ones_say_why() {
        assert_eq!(Request::parse(&json!({"cmd": "status"})).unwrap(), Request::Status);
        assert_eq!(
            Request::parse(&json!({"cmd": "load_model", "path": "m.safetensors"})).unwrap(),
            Request::LoadModel { path: "m.safetensors".into(), carry_state: true }
        );
        assert_eq!(
            Request::parse(&json!({"cmd": "mask", "channels": [3, 1]})).unwrap(),
            Request::Mask { channels: vec![3, 1] }
        );
        assert!(err(json!([1, 2])).contains("a JSON object with a \"cmd\" key, not an array"));
        assert!(err(json!({"channels": []})).contains("no \"cmd\" key"));
        assert!(err(json!({"cmd": 7})).contains("\"cmd\" must be a string, not a number"));
        let e = err(json!({"cmd": "explode"}));
        assert!(e.contains("unknown variant `explode`") && e.contains("load_model"), "{e}");
        let e = err(json!({"cmd": "mask", "channels": "all"}));
        assert!(e.contains("\"mask\"") && e.contains("invalid type: string \"all\", expected a sequence"), "{e}");
        let e = err(json!({"cmd": "mask", "channels": [-1]}));
        assert!(e.contains("invalid value: integer `-1`"), "{e}");
        let e = err(json!({"cmd": "load_model"}));
        assert!(e.contains("missing field `path`"), "{e}");
        let e = err(json!({"cmd": "status", "verbose": true}));
        assert!(e.contains("unknown field `verbose`"), "{e}");
        assert!(err(json!({"cmd": "calibrate", "seconds": -3})).contains("seconds must be a positive number"));
        assert!(err(json!({"cmd": "event", "label": " "})).contains("label is empty"));
    }
}
