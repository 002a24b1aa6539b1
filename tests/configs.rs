//! Every shipped rig config loads and validates (paths, bin widths, model channels).

use latentloop::any_model::AnyModel;
use latentloop::config::RigConfig;

#[test]
fn every_shipped_rig_config_is_valid() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("rig-configs");
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let p = entry.unwrap().path();
        if p.extension().is_some_and(|e| e == "toml") {
            let cfg = RigConfig::load(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            if let Some(m) = cfg.model_path() {
                let model = AnyModel::load(&m).unwrap();
                assert_eq!(model.channels(), *cfg.source.channels.get_ref(), "{}", p.display());
            }
            n += 1;
        }
    }
    assert!(n >= 5, "{n} configs");
}
