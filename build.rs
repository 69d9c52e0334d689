//! Build script: generates the gRPC code and reflection descriptor from `proto/`, and makes sure a
//! CUDA-enabled libtorch stays linked so the same binary finds the GPU when one is present.

use std::{env, path::PathBuf, process::Command};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    compile_protos()?;
    link_libtorch_cuda();
    Ok(())
}

fn compile_protos() -> Result<(), Box<dyn std::error::Error>> {
    // A vendored protoc keeps a fresh machine free of a system protobuf-compiler requirement;
    // an explicit PROTOC still wins.
    if env::var_os("PROTOC").is_none() {
        env::set_var("PROTOC", protoc_bin_vendored::protoc_bin_path()?);
    }
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        .file_descriptor_set_path(out_dir.join("caption_descriptor.bin"))
        .compile_protos(&["proto/caption/v1/caption.proto"], &["proto"])?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}

/// The default `--as-needed` linker mode drops libtorch_cuda because no Rust symbol references it,
/// and then libtorch never registers its CUDA backend. Force it in when this libtorch ships it.
fn link_libtorch_cuda() {
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    println!("cargo:rerun-if-env-changed=LIBTORCH_USE_PYTORCH");
    let Some(lib_dir) = libtorch_lib_dir() else {
        return;
    };
    // Lets binaries and test executables start without LD_LIBRARY_PATH; LD_LIBRARY_PATH still
    // overrides it (RUNPATH), which is how a deployment points at another libtorch of the same version.
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib_dir.display());
    if lib_dir.join("libtorch_cuda.so").exists() {
        println!("cargo:rustc-link-search=native={}", lib_dir.display());
        println!("cargo:rustc-link-arg=-Wl,--push-state,--no-as-needed,-ltorch_cuda,--pop-state");
    }
}

fn libtorch_lib_dir() -> Option<PathBuf> {
    if let Some(root) = env::var_os("LIBTORCH") {
        return Some(PathBuf::from(root).join("lib"));
    }
    if env::var_os("LIBTORCH_USE_PYTORCH").is_some() {
        let python = env::var("PYTHON_SYS_EXECUTABLE").unwrap_or_else(|_| "python3".into());
        let out = Command::new(python)
            .args(["-c", "import os, torch; print(os.path.dirname(torch.__file__))"])
            .output()
            .ok()?;
        let root = String::from_utf8(out.stdout).ok()?;
        return Some(PathBuf::from(root.trim()).join("lib"));
    }
    None
}
