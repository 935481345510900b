//! Build script: uses the committed bindings, or regenerates them with bindgen when asked.
//!
//! - Default: nothing is generated; `src/bindings.rs` and `src/bindings_optional.rs` are used.
//! - Feature `bindgen`: bindings are generated from `include/nrt/*.h` into `OUT_DIR` and used instead
//!   (needs libclang). With `NEURON_SYS_INCLUDE_DIR=/opt/aws/neuron/include` the core bindings are
//!   generated from a real Neuron SDK's `nrt/nrt.h` instead of the project's header.
//! - Feature `bindgen` and `NEURON_SYS_UPDATE_BINDINGS=1`: the generated files also replace the
//!   committed ones (formatted with rustfmt), which is how they are regenerated:
//!   `NEURON_SYS_UPDATE_BINDINGS=1 cargo build -p neuron-sys --features bindgen`.

use std::env;
use std::error::Error;
use std::path::{Path, PathBuf};

/// Tells rustc which bindings to compile (`cfg(neuron_sys_generated)` = the ones in `OUT_DIR`).
const GENERATED_CFG: &str = "neuron_sys_generated";

fn main() -> Result<(), Box<dyn Error>> {
    println!("cargo::rustc-check-cfg=cfg({GENERATED_CFG})");
    println!("cargo::rerun-if-changed=build.rs");
    println!("cargo::rerun-if-changed=include/nrt");
    println!("cargo::rerun-if-env-changed=NEURON_SYS_INCLUDE_DIR");
    println!("cargo::rerun-if-env-changed=NEURON_SYS_UPDATE_BINDINGS");
    generate()
}

#[cfg(not(feature = "bindgen"))]
fn generate() -> Result<(), Box<dyn Error>> {
    if env::var_os("NEURON_SYS_INCLUDE_DIR").is_some() {
        println!(
            "cargo::warning=NEURON_SYS_INCLUDE_DIR is set but the `bindgen` feature is off: using the \
             committed bindings (build with `--features neuron-sys/bindgen` to generate from the SDK)"
        );
    }
    if update_requested() {
        return Err("NEURON_SYS_UPDATE_BINDINGS needs the `bindgen` feature: \
                    NEURON_SYS_UPDATE_BINDINGS=1 cargo build -p neuron-sys --features bindgen"
            .into());
    }
    Ok(())
}

#[cfg(feature = "bindgen")]
fn generate() -> Result<(), Box<dyn Error>> {
    let manifest_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR")?);
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    let own_include = manifest_dir.join("include");
    let sdk_include = env::var_os("NEURON_SYS_INCLUDE_DIR").map(PathBuf::from);
    let core_include = sdk_include.clone().unwrap_or_else(|| own_include.clone());
    let core_header = core_include.join("nrt").join("nrt.h");
    if !core_header.is_file() {
        return Err(format!(
            "{} not found: NEURON_SYS_INCLUDE_DIR must be the SDK's include directory \
             (the one holding nrt/nrt.h, e.g. /opt/aws/neuron/include)",
            core_header.display()
        )
        .into());
    }
    if let Some(dir) = &sdk_include {
        println!("cargo::rerun-if-changed={}", dir.join("nrt").display());
    }

    let core = generation::core(&core_header, &core_include)?;
    let optional = generation::optional(&own_include.join("nrt").join("nrt_optional.h"), &own_include)?;
    std::fs::write(out_dir.join("bindings.rs"), &core)?;
    std::fs::write(out_dir.join("bindings_optional.rs"), &optional)?;
    println!("cargo::rustc-cfg={GENERATED_CFG}");

    if update_requested() {
        if sdk_include.is_some() {
            return Err("refusing to commit bindings generated from an SDK header: unset \
                        NEURON_SYS_INCLUDE_DIR to regenerate from include/nrt/*.h"
                .into());
        }
        for (name, text) in [("bindings.rs", &core), ("bindings_optional.rs", &optional)] {
            let target = manifest_dir.join("src").join(name);
            std::fs::write(&target, text)?;
            rustfmt(&target)?;
        }
        println!("cargo::warning=neuron-sys: regenerated src/bindings.rs and src/bindings_optional.rs");
    }
    Ok(())
}

/// True when `NEURON_SYS_UPDATE_BINDINGS` is set to anything but empty or `0`.
fn update_requested() -> bool {
    env::var("NEURON_SYS_UPDATE_BINDINGS").is_ok_and(|v| !v.is_empty() && v != "0")
}

/// Formats `file` in place with the toolchain's rustfmt (it picks up the project's rustfmt config).
#[cfg_attr(not(feature = "bindgen"), allow(dead_code))]
fn rustfmt(file: &Path) -> Result<(), Box<dyn Error>> {
    let rustfmt = env::var_os("RUSTFMT").unwrap_or_else(|| "rustfmt".into());
    let status = std::process::Command::new(&rustfmt)
        .args(["--edition", "2024"])
        .arg(file)
        .status()
        .map_err(|e| format!("cannot run rustfmt ({}): {e}", PathBuf::from(&rustfmt).display()))?;
    if !status.success() {
        return Err(format!("rustfmt failed on {}: {status}", file.display()).into());
    }
    Ok(())
}

#[cfg(feature = "bindgen")]
mod generation {
    //! The bindgen configuration, pinned so that regeneration is byte-identical.

    use std::error::Error;
    use std::path::Path;

    /// Core functions that every supported runtime exports (loaded together, all required).
    const CORE_FUNCTIONS: &str = "nrt_(init|close|load|load_collectives|unload|get_total_nc_count|get_visible_nc_count\
                                  |get_model_tensor_info|free_model_tensor_info|allocate_tensor_set\
                                  |destroy_tensor_set|add_tensor_to_tensor_set|get_tensor_from_tensor_set\
                                  |tensor_allocate|tensor_free|tensor_read|tensor_write|tensor_get_size\
                                  |tensor_allocate_empty|tensor_attach_buffer|execute|execute_repeat\
                                  |get_version)";

    /// Functions resolved one by one; their absence is not an error.
    const OPTIONAL_FUNCTIONS: &str = "nrt_(get_status_as_str|get_total_vnc_count|get_visible_vnc_count\
                                      |profile_start|profile_stop|tensor_copy|get_vnc_memory_stats)";

    fn common(header: &Path, include: &Path, banner: &str) -> Result<bindgen::Builder, Box<dyn Error>> {
        let header = header.to_str().ok_or("header path is not UTF-8")?;
        Ok(bindgen::Builder::default()
            .header(header)
            .clang_arg(format!("-I{}", include.display()))
            .clang_arg("-std=c11")
            .rust_target(bindgen::RustTarget::stable(85, 0).map_err(|e| e.to_string())?)
            .rust_edition(bindgen::RustEdition::Edition2024)
            .formatter(bindgen::Formatter::None)
            .disable_header_comment()
            .raw_line(banner)
            .default_enum_style(bindgen::EnumVariation::Consts)
            .prepend_enum_name(false)
            .layout_tests(true)
            .derive_default(true)
            .derive_debug(true)
            .impl_debug(false)
            .generate_comments(false)
            .wrap_unsafe_ops(true)
            .size_t_is_usize(true)
            .sort_semantically(true))
    }

    /// Types, constants and the `Nrt` table of core functions from `nrt.h`.
    pub fn core(header: &Path, include: &Path) -> Result<String, Box<dyn Error>> {
        let bindings = common(
            header,
            include,
            "// Generated by bindgen from include/nrt/nrt.h. Do not edit: regenerate with\n\
             // `NEURON_SYS_UPDATE_BINDINGS=1 cargo build -p neuron-sys --features bindgen`.",
        )?
        .allowlist_function(CORE_FUNCTIONS)
        .allowlist_type("nrt_.*|NRT_.*")
        .allowlist_var("NRT_.*")
        .dynamic_library_name("Nrt")
        .dynamic_link_require_all(true)
        .generate()
        .map_err(|e| format!("bindgen failed on {}: {e}", header.display()))?;
        Ok(bindings.to_string())
    }

    /// The `NrtOptional` table from `nrt_optional.h`; its types come from the core bindings.
    pub fn optional(header: &Path, include: &Path) -> Result<String, Box<dyn Error>> {
        let bindings = common(
            header,
            include,
            "// Generated by bindgen from include/nrt/nrt_optional.h. Do not edit: regenerate with\n\
             // `NEURON_SYS_UPDATE_BINDINGS=1 cargo build -p neuron-sys --features bindgen`.",
        )?
        .allowlist_function(OPTIONAL_FUNCTIONS)
        .allowlist_recursively(false)
        .dynamic_library_name("NrtOptional")
        .dynamic_link_require_all(false)
        .generate()
        .map_err(|e| format!("bindgen failed on {}: {e}", header.display()))?;
        Ok(bindings.to_string())
    }
}
