//! The Kubernetes manifests' connectors (deploy/kubernetes/configmap.yaml) load in the worker as
//! a ConfigMap volume lays them out, with their `${ENV}` secrets; `.ci/k8s-validate.sh` checks the
//! manifests themselves.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};

use mqtt_connector::connectors::ConnectorStore;

const CONFIGMAP: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/deploy/kubernetes/configmap.yaml"
);

/// The `data` of the connectors ConfigMap: file name → content.
fn configmap_files() -> BTreeMap<String, String> {
    let text = fs::read_to_string(CONFIGMAP).expect("read deploy/kubernetes/configmap.yaml");
    let doc: serde_yaml_ng::Value = serde_yaml_ng::from_str(&text).expect("configmap.yaml is YAML");
    let data = doc.get("data").expect("the ConfigMap has data");
    serde_yaml_ng::from_value(data.clone()).expect("data maps file names to strings")
}

/// Lays `files` out as the kubelet mounts a ConfigMap: the files in a timestamped hidden folder,
/// a `..data` link to it, and each `NAME` a link to `..data/NAME`.
fn kubelet_configmap_volume(root: &Path, files: &BTreeMap<String, String>) -> PathBuf {
    let timestamped = root.join("..2026_12_02_14_00_00.000000001");
    fs::create_dir(&timestamped).expect("create the timestamped folder");
    for (name, content) in files {
        fs::write(timestamped.join(name), content).expect("write a connector");
    }
    symlink(
        timestamped.file_name().expect("folder name"),
        root.join("..data"),
    )
    .expect("..data");
    for name in files.keys() {
        symlink(Path::new("..data").join(name), root.join(name)).expect("link a connector");
    }
    root.to_path_buf()
}

#[test]
fn configmap_connectors_load_from_a_kubelet_volume() {
    let files = configmap_files();
    assert!(
        files.contains_key("devices.json"),
        "the ConfigMap names {:?}",
        files.keys()
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let volume = kubelet_configmap_volume(dir.path(), &files);

    let store = ConnectorStore::load_with_env(&volume, |name| {
        (name == "MQTT_PASSWORD").then(|| "from-the-secret".to_owned())
    })
    .unwrap_or_else(|err| panic!("the worker refuses the manifest's connectors: {err}"));

    // Every NAME.json is one connector; the kubelet's hidden entries are not connectors.
    assert_eq!(store.len(), files.len());
    let devices = store.get("devices").expect("connector devices");
    assert_eq!(
        devices.defaults.broker.as_deref(),
        Some("tcp://mosquitto.mqtt.svc.cluster.local:1883")
    );
    assert!(
        devices.job_may_set.is_some(),
        "the hardened connector names the keys jobs may set"
    );
    let password = devices
        .defaults
        .password
        .as_ref()
        .expect("the connector has a password");
    assert!(
        password.expose() == "from-the-secret",
        "the password is not the Secret's value from ${{MQTT_PASSWORD}}"
    );
    eprintln!(
        "manifests: {} connector(s) loaded from a kubelet-style ConfigMap volume",
        store.len()
    );
}

#[test]
fn configmap_connectors_need_their_secret_in_the_environment() {
    let dir = tempfile::tempdir().expect("tempdir");
    let volume = kubelet_configmap_volume(dir.path(), &configmap_files());
    let err = ConnectorStore::load_with_env(&volume, |_| None)
        .expect_err("a connector whose ${MQTT_PASSWORD} is not set must stop the worker");
    assert!(
        err.to_string().contains("MQTT_PASSWORD"),
        "the error names the missing variable: {err}"
    );
}
