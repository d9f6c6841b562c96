//! Embeds every `shaders/*.wgsl` file in the library, keyed by file stem, so a new op family
//! needs no registration line and the binary runs without the source tree.

use std::{env, fs, path::Path};

fn main() {
    let dir = Path::new(&env::var("CARGO_MANIFEST_DIR").unwrap()).join("shaders");
    println!("cargo:rerun-if-changed={}", dir.display());
    let mut entries: Vec<_> = fs::read_dir(&dir)
        .expect("shaders/ directory")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "wgsl"))
        .collect();
    entries.sort();
    let mut out = String::from("/// (name, WGSL source) of every file in `shaders/`.\n");
    out.push_str("pub const SHADERS: &[(&str, &str)] = &[\n");
    for p in &entries {
        println!("cargo:rerun-if-changed={}", p.display());
        let stem = p.file_stem().unwrap().to_string_lossy();
        out.push_str(&format!("    ({stem:?}, include_str!({:?})),\n", p.display().to_string()));
    }
    out.push_str("];\n");
    fs::write(Path::new(&env::var("OUT_DIR").unwrap()).join("shaders.rs"), out).unwrap();
}
