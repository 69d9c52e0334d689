//! Build script: generates the gRPC code and reflection descriptor from `proto/`, and makes sure a
//! CUDA-enabled libtorch stays linked so the same binary finds the GPU when one is present.
//! `CAPTION_CPU_ONLY=1` opts out of the CUDA linking: the binary then needs only libtorch_cpu,
//! libc10 (and what they load), which is how the CPU container image is built (see `Dockerfile`).

use std::{
    env,
    path::{Path, PathBuf},
    process::Command,
};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    compile_protos()?;
    println!("cargo::rustc-check-cfg=cfg(cuda_streams)");
    let cpu_only = cpu_only();
    if let Some(lib_dir) = libtorch_lib_dir() {
        link_rpath(&lib_dir);
        if !cpu_only {
            link_libtorch_cuda(&lib_dir);
            compile_stream_shim(&lib_dir);
        }
    }
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
        // Says whose fault a message that does not decode is (src/pb/codec.rs).
        .codec_path("crate::pb::Codec")
        .file_descriptor_set_path(out_dir.join("caption_descriptor.bin"))
        .compile_protos(&["proto/caption/v1/caption.proto"], &["proto"])?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}

/// `CAPTION_CPU_ONLY` set and neither empty nor `0`: link no CUDA library even when this libtorch
/// has them. torch-sys still passes `-ltorch_cuda`, but the linker's default `--as-needed` drops it
/// (no symbol of it is used), so the binary needs neither libtorch_cuda nor libc10_cuda.
fn cpu_only() -> bool {
    println!("cargo:rerun-if-env-changed=CAPTION_CPU_ONLY");
    env::var_os("CAPTION_CPU_ONLY").is_some_and(|v| !v.is_empty() && v != "0")
}

/// Lets binaries and test executables start without LD_LIBRARY_PATH; LD_LIBRARY_PATH still
/// overrides it (RUNPATH), which is how a deployment points at another libtorch of the same version.
fn link_rpath(lib_dir: &Path) {
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib_dir.display());
}

/// The default `--as-needed` linker mode drops libtorch_cuda because no Rust symbol references it,
/// and then libtorch never registers its CUDA backend. Force it in when this libtorch ships it.
fn link_libtorch_cuda(lib_dir: &Path) {
    if lib_dir.join("libtorch_cuda.so").exists() {
        println!("cargo:rustc-link-search=native={}", lib_dir.display());
        println!("cargo:rustc-link-arg=-Wl,--push-state,--no-as-needed,-ltorch_cuda,--pop-state");
    }
}

/// Compiles `csrc/cuda_stream.cpp` (per-executor CUDA streams) when this libtorch has CUDA and
/// the CUDA runtime headers are found; the Rust side is enabled by `cfg(cuda_streams)`.
fn compile_stream_shim(lib_dir: &Path) {
    println!("cargo:rerun-if-changed=csrc/cuda_stream.cpp");
    println!("cargo:rerun-if-env-changed=CUDA_HOME");
    let root = lib_dir.parent().expect("libtorch root");
    let include = root.join("include");
    if !lib_dir.join("libtorch_cuda.so").exists() || !include.join("c10/cuda/CUDAStream.h").exists() {
        return;
    }
    // The CUDA runtime headers: a toolkit, or the wheels next to a pip-installed torch.
    let site = root.parent().map(Path::to_path_buf).unwrap_or_default();
    let mut candidates: Vec<PathBuf> =
        env::var_os("CUDA_HOME").map(|h| PathBuf::from(h).join("include")).into_iter().collect();
    candidates.push(PathBuf::from("/usr/local/cuda/include"));
    if let Ok(entries) = std::fs::read_dir(site.join("nvidia")) {
        for e in entries.flatten() {
            candidates.push(e.path().join("include"));
        }
    }
    // Triton, which pip-installed torch brings along, ships a complete set of CUDA headers.
    candidates.push(site.join("triton/backends/nvidia/include"));
    let complete = |d: &PathBuf| d.join("cuda_runtime_api.h").exists() && d.join("crt/host_defines.h").exists();
    let Some(cuda_include) = candidates.into_iter().find(complete) else {
        println!("cargo:warning=libtorch has CUDA but no cuda_runtime_api.h was found (set CUDA_HOME): executors will share the default stream");
        return;
    };
    cc::Build::new()
        .cpp(true)
        .file("csrc/cuda_stream.cpp")
        .include(&include)
        .include(include.join("torch/csrc/api/include"))
        .include(cuda_include)
        .flag("-std=c++17")
        .flag("-w")
        .define("_GLIBCXX_USE_CXX11_ABI", "1")
        .compile("caption_cascade_cuda_stream");
    println!("cargo:rustc-link-lib=dylib=c10_cuda");
    println!("cargo:rustc-cfg=cuda_streams");
}

fn libtorch_lib_dir() -> Option<PathBuf> {
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    println!("cargo:rerun-if-env-changed=LIBTORCH_USE_PYTORCH");
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
