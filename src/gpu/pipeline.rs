//! The pipeline cache: each WGSL file is validated by naga and turned into a shader module
//! once per device, and each (file, entry point, override constants) into a compute
//! pipeline once per device. lavapipe compiles a pipeline in 0.2-1.8 s, so this matters.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::error::{Error, Result};

include!(concat!(env!("OUT_DIR"), "/shaders.rs"));

/// The WGSL source of `shaders/<name>.wgsl`.
pub fn shader_source(name: &str) -> Option<&'static str> {
    SHADERS.iter().find(|(n, _)| *n == name).map(|(_, s)| *s)
}

/// Names of every embedded shader file.
pub fn shader_names() -> impl Iterator<Item = &'static str> {
    SHADERS.iter().map(|(n, _)| *n)
}

/// Parses and validates WGSL with naga, as wgpu would, returning the module and its analysis.
pub fn validate_wgsl(name: &str, source: &str) -> Result<(naga::Module, naga::valid::ModuleInfo)> {
    let module = naga::front::wgsl::parse_str(source).map_err(|e| Error::ShaderValidation {
        name: name.to_string(),
        message: e.emit_to_string_with_path(source, &format!("shaders/{name}.wgsl")),
    })?;
    let info = naga::valid::Validator::new(naga::valid::ValidationFlags::all(), naga::valid::Capabilities::default())
        .validate(&module)
        .map_err(|e| Error::ShaderValidation {
            name: name.to_string(),
            message: e.emit_to_string_with_path(source, &format!("shaders/{name}.wgsl")),
        })?;
    Ok((module, info))
}

/// A compiled pipeline with the bindings (group 0) its entry point really uses: auto layouts
/// drop unused bindings, so launchers pass every argument and the dispatcher keeps these.
pub(crate) struct CachedPipeline {
    pub pipeline: wgpu::ComputePipeline,
    pub layout: wgpu::BindGroupLayout,
    pub used_bindings: Vec<u32>,
}

struct ShaderEntry {
    module: wgpu::ShaderModule,
    naga: naga::Module,
    info: naga::valid::ModuleInfo,
}

type Key = (&'static str, &'static str, Vec<(&'static str, u64)>);

#[derive(Default)]
pub(crate) struct PipelineCache {
    shaders: Mutex<HashMap<&'static str, Arc<ShaderEntry>>>,
    pipelines: Mutex<HashMap<Key, Arc<CachedPipeline>>>,
}

impl PipelineCache {
    /// Number of pipelines compiled on this device so far.
    pub fn len(&self) -> usize {
        self.pipelines.lock().unwrap().len()
    }

    fn shader(&self, device: &wgpu::Device, name: &'static str) -> Result<Arc<ShaderEntry>> {
        if let Some(s) = self.shaders.lock().unwrap().get(name) {
            return Ok(s.clone());
        }
        let source = shader_source(name).ok_or_else(|| Error::UnknownShader(name.to_string()))?;
        let (naga, info) = validate_wgsl(name, source)?;
        let module = device.create_shader_module(wgpu::ShaderModuleDescriptor {
            label: Some(name),
            source: wgpu::ShaderSource::Wgsl(source.into()),
        });
        let entry = Arc::new(ShaderEntry { module, naga, info });
        self.shaders.lock().unwrap().insert(name, entry.clone());
        Ok(entry)
    }

    pub fn get(
        &self,
        device: &wgpu::Device,
        shader: &'static str,
        entry: &'static str,
        constants: &[(&'static str, f64)],
    ) -> Result<Arc<CachedPipeline>> {
        let key: Key = (shader, entry, constants.iter().map(|(k, v)| (*k, v.to_bits())).collect());
        if let Some(p) = self.pipelines.lock().unwrap().get(&key) {
            return Ok(p.clone());
        }
        let s = self.shader(device, shader)?;
        let ep_index = s
            .naga
            .entry_points
            .iter()
            .position(|e| e.name == entry)
            .ok_or_else(|| Error::UnknownShader(format!("{shader}::{entry}")))?;
        let ep_info = s.info.get_entry_point(ep_index);
        let mut used_bindings: Vec<u32> = s
            .naga
            .global_variables
            .iter()
            .filter_map(|(h, var)| {
                let b = var.binding.as_ref()?;
                (b.group == 0 && !ep_info[h].is_empty()).then_some(b.binding)
            })
            .collect();
        used_bindings.sort_unstable();
        let pipeline = device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
            label: Some(&format!("{shader}::{entry}")),
            layout: None,
            module: &s.module,
            entry_point: Some(entry),
            compilation_options: wgpu::PipelineCompilationOptions {
                constants,
                zero_initialize_workgroup_memory: false,
            },
            cache: None,
        });
        let layout = pipeline.get_bind_group_layout(0);
        let cached = Arc::new(CachedPipeline { pipeline, layout, used_bindings });
        self.pipelines.lock().unwrap().insert(key, cached.clone());
        Ok(cached)
    }
}
