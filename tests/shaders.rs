//! Every `.wgsl` file in `shaders/` parses and validates with naga, and is embedded in the
//! library under its file name; a broken shader is a typed error, not a panic.

use featreplay::gpu::pipeline::{shader_names, shader_source, validate_wgsl};
use featreplay::Error;

#[test]
fn every_shader_file_validates_and_is_embedded() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("shaders");
    let mut count = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "wgsl") {
            continue;
        }
        let name = path.file_stem().unwrap().to_string_lossy().to_string();
        let source = std::fs::read_to_string(&path).unwrap();
        let (module, _) = validate_wgsl(&name, &source).unwrap_or_else(|e| panic!("{e}"));
        assert!(!module.entry_points.is_empty(), "{name} has no entry point");
        assert_eq!(shader_source(&name), Some(source.as_str()), "{name} is not embedded (rebuild?)");
        count += 1;
    }
    assert_eq!(count, shader_names().count(), "embedded shaders and files in shaders/ differ");
    assert!(count >= 8, "expected every op family's shader, found {count}");
}

#[test]
fn broken_shader_is_a_validation_error() {
    let parse = validate_wgsl("broken", "@compute @workgroup_size(1) fn main() { let x: f32 = 1u; }");
    match parse {
        Err(Error::ShaderValidation { name, message }) => {
            assert_eq!(name, "broken");
            assert!(!message.is_empty());
        }
        other => panic!("expected a validation error, got {:?}", other.map(|_| ())),
    }
    let syntax = validate_wgsl("syntax", "fn (");
    assert!(matches!(syntax, Err(Error::ShaderValidation { .. })));
}
