//! The Helm chart in helm/ lints clean, renders with default and overridden values into manifests
//! valid on the Kubernetes versions it claims, and wires the server the way a deployer relies on.
//! The checks live in tests/helm/check_chart.py, which drives Helm's own SDK (no helm binary or
//! cluster needed); `make test` installs its packages from tests/helm/requirements.txt.

use std::process::Command;

#[test]
fn helm_chart_lints_renders_and_validates() {
    let root = env!("CARGO_MANIFEST_DIR");
    let python = format!("{root}/.venv/bin/python");
    let out = Command::new(&python)
        .arg(format!("{root}/tests/helm/check_chart.py"))
        .current_dir(root)
        .output()
        .unwrap_or_else(|e| panic!("{python}: {e} (make test creates .venv and installs tests/helm/requirements.txt)"));
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "chart check failed ({}):\n{stderr}{stdout}", out.status);
    println!("{stdout}");
}
