//! Adapter discovery and selection.
//!
//! Every adapter wgpu can reach is listed with its name, backend, type and driver. A user
//! picks one by index (`1`), by type (`type:discrete`), by backend (`backend:vulkan`) or by a
//! name substring (`llvmpipe`), from the API, the `FEATREPLAY_ADAPTER` environment variable
//! or the CLI. Without a choice, real GPUs win over CPU adapters, and Vulkan wins over GL for
//! the same hardware (wgpu also reports a GL llvmpipe next to the Vulkan one).

use std::fmt;
use std::str::FromStr;

use crate::error::{Error, Result};

/// Environment variable that selects an adapter when the API or CLI does not.
pub const ADAPTER_ENV: &str = "FEATREPLAY_ADAPTER";

/// What a user sees of an adapter in `featreplay devices`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdapterSummary {
    /// Position in the (stable, sorted) adapter list: what `--device N` refers to.
    pub index: usize,
    pub name: String,
    pub backend: wgpu::Backend,
    pub device_type: wgpu::DeviceType,
    pub driver: String,
    pub driver_info: String,
    pub vendor: u32,
    pub device: u32,
}

impl AdapterSummary {
    fn from_info(index: usize, info: &wgpu::AdapterInfo) -> Self {
        AdapterSummary {
            index,
            name: info.name.clone(),
            backend: info.backend,
            device_type: info.device_type,
            driver: info.driver.clone(),
            driver_info: info.driver_info.clone(),
            vendor: info.vendor,
            device: info.device,
        }
    }

    /// True for software adapters (lavapipe, llvmpipe GL, WARP): kernels tuned for CPUs apply.
    pub fn is_cpu(&self) -> bool {
        self.device_type == wgpu::DeviceType::Cpu
    }

    /// True for Mesa's lavapipe (a CPU adapter on Vulkan), whose thread pool `LP_NUM_THREADS`
    /// sizes per wgpu instance.
    pub fn is_lavapipe(&self) -> bool {
        self.is_cpu() && self.backend == wgpu::Backend::Vulkan
    }
}

impl fmt::Display for AdapterSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "[{}] {} ({:?}, {}, driver: {} {})",
            self.index,
            self.name,
            self.device_type,
            backend_name(self.backend),
            self.driver,
            self.driver_info
        )
    }
}

/// Lower-case backend name as users type it.
pub fn backend_name(backend: wgpu::Backend) -> &'static str {
    match backend {
        wgpu::Backend::Vulkan => "vulkan",
        wgpu::Backend::Metal => "metal",
        wgpu::Backend::Dx12 => "dx12",
        wgpu::Backend::Gl => "gl",
        wgpu::Backend::BrowserWebGpu => "webgpu",
        _ => "other",
    }
}

fn type_rank(t: wgpu::DeviceType) -> u8 {
    match t {
        wgpu::DeviceType::DiscreteGpu => 0,
        wgpu::DeviceType::IntegratedGpu => 1,
        wgpu::DeviceType::VirtualGpu => 2,
        wgpu::DeviceType::Other => 3,
        wgpu::DeviceType::Cpu => 4,
    }
}

fn backend_rank(b: wgpu::Backend) -> u8 {
    match b {
        wgpu::Backend::Vulkan => 0,
        wgpu::Backend::Metal => 1,
        wgpu::Backend::Dx12 => 2,
        wgpu::Backend::Gl => 3,
        _ => 4,
    }
}

/// How a user names the adapter they want.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum AdapterSelector {
    /// The preferred adapter: real GPUs before CPU adapters, Vulkan first.
    #[default]
    Auto,
    /// Position in [`list_adapters`]'s order.
    Index(usize),
    /// First adapter (in preference order) of this type.
    Type(wgpu::DeviceType),
    /// First adapter (in preference order) of this backend.
    Backend(wgpu::Backend),
    /// First adapter (in preference order) whose name contains this text (case-insensitive).
    Name(String),
}

impl AdapterSelector {
    /// The selector from `FEATREPLAY_ADAPTER`, or `Auto` when unset or empty.
    pub fn from_env() -> Result<Self> {
        match std::env::var(ADAPTER_ENV) {
            Ok(s) if !s.trim().is_empty() => s.parse(),
            _ => Ok(AdapterSelector::Auto),
        }
    }
}

impl FromStr for AdapterSelector {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        let s = s.trim();
        if s.is_empty() || s.eq_ignore_ascii_case("auto") {
            return Ok(AdapterSelector::Auto);
        }
        if let Ok(i) = s.parse::<usize>() {
            return Ok(AdapterSelector::Index(i));
        }
        if let Some(t) = s.strip_prefix("type:") {
            let t = match t.to_ascii_lowercase().as_str() {
                "discrete" | "discretegpu" | "gpu" => wgpu::DeviceType::DiscreteGpu,
                "integrated" | "integratedgpu" => wgpu::DeviceType::IntegratedGpu,
                "virtual" | "virtualgpu" => wgpu::DeviceType::VirtualGpu,
                "cpu" => wgpu::DeviceType::Cpu,
                "other" => wgpu::DeviceType::Other,
                _ => return Err(Error::BadSelector(s.to_string())),
            };
            return Ok(AdapterSelector::Type(t));
        }
        if let Some(b) = s.strip_prefix("backend:") {
            let b = match b.to_ascii_lowercase().as_str() {
                "vulkan" | "vk" => wgpu::Backend::Vulkan,
                "metal" => wgpu::Backend::Metal,
                "dx12" | "d3d12" => wgpu::Backend::Dx12,
                "gl" | "gles" | "opengl" => wgpu::Backend::Gl,
                _ => return Err(Error::BadSelector(s.to_string())),
            };
            return Ok(AdapterSelector::Backend(b));
        }
        if s.contains(':') {
            return Err(Error::BadSelector(s.to_string()));
        }
        Ok(AdapterSelector::Name(s.to_string()))
    }
}

impl fmt::Display for AdapterSelector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AdapterSelector::Auto => write!(f, "auto"),
            AdapterSelector::Index(i) => write!(f, "{i}"),
            AdapterSelector::Type(t) => write!(f, "type:{t:?}"),
            AdapterSelector::Backend(b) => write!(f, "backend:{}", backend_name(*b)),
            AdapterSelector::Name(n) => write!(f, "{n}"),
        }
    }
}

/// A new wgpu instance on the backends `WGPU_BACKEND` names, by default Vulkan, Metal and
/// DX12. GL is left out by default: it duplicates the primary view of the same hardware
/// (llvmpipe GL next to lavapipe), and initialising it makes EGL print warnings on headless
/// machines. It is used when the user asks for it or when no primary adapter exists.
pub fn new_instance() -> wgpu::Instance {
    let mut desc = wgpu::InstanceDescriptor::new_without_display_handle_from_env();
    if std::env::var_os("WGPU_BACKEND").is_none() {
        desc.backends = wgpu::Backends::PRIMARY;
    }
    wgpu::Instance::new(desc)
}

fn gl_instance() -> wgpu::Instance {
    let mut desc = wgpu::InstanceDescriptor::new_without_display_handle_from_env();
    desc.backends = wgpu::Backends::GL;
    wgpu::Instance::new(desc)
}

/// Every adapter of `instance`, in preference order (this order defines the indices).
pub fn enumerate(instance: &wgpu::Instance) -> Vec<wgpu::Adapter> {
    let mut adapters = pollster::block_on(instance.enumerate_adapters(wgpu::Backends::all()));
    // Stable order: type, then backend, then name, so indices do not change between runs.
    adapters.sort_by_key(|a| {
        let i = a.get_info();
        (type_rank(i.device_type), backend_rank(i.backend), i.name.clone(), i.device)
    });
    adapters
}

/// Every adapter this machine offers, in preference order.
pub fn list_adapters() -> Vec<AdapterSummary> {
    enumerate(&new_instance()).iter().enumerate().map(|(i, a)| AdapterSummary::from_info(i, &a.get_info())).collect()
}

/// What to print when there is no adapter at all.
pub fn no_adapter_hint() -> String {
    "Install a GPU driver with Vulkan, Metal or DX12 support, or Mesa's software Vulkan driver: \
     on Debian/Ubuntu `sudo apt-get install mesa-vulkan-drivers libvulkan1`, on Fedora \
     `sudo dnf install mesa-vulkan-drivers vulkan-loader`, on Arch `sudo pacman -S vulkan-swrast`."
        .to_string()
}

fn backends_tried() -> String {
    let b = wgpu::Instance::enabled_backend_features();
    format!("{b:?}")
}

/// Picks the adapter `selector` names from `instance` and returns it with its summary.
pub fn select(instance: &wgpu::Instance, selector: &AdapterSelector) -> Result<(wgpu::Adapter, AdapterSummary)> {
    let mut adapters = enumerate(instance);
    // GL is the fallback when the instance offers nothing, or what `backend:gl` asks for.
    let wants_gl = *selector == AdapterSelector::Backend(wgpu::Backend::Gl);
    if (adapters.is_empty() && instance_allows_gl_fallback()) || (wants_gl && !matches_any(&adapters, selector)) {
        adapters = enumerate(&gl_instance());
    }
    choose(adapters, selector)
}

/// Picks the adapter `selector` names from `adapters` (in [`enumerate`]'s order).
pub fn choose(adapters: Vec<wgpu::Adapter>, selector: &AdapterSelector) -> Result<(wgpu::Adapter, AdapterSummary)> {
    if adapters.is_empty() {
        return Err(Error::NoAdapter { backends: backends_tried(), hint: no_adapter_hint() });
    }
    let summaries: Vec<AdapterSummary> =
        adapters.iter().enumerate().map(|(i, a)| AdapterSummary::from_info(i, &a.get_info())).collect();
    let pos = match selector {
        AdapterSelector::Auto => Some(0),
        AdapterSelector::Index(i) => (*i < adapters.len()).then_some(*i),
        AdapterSelector::Type(t) => summaries.iter().position(|s| s.device_type == *t),
        AdapterSelector::Backend(b) => summaries.iter().position(|s| s.backend == *b),
        AdapterSelector::Name(n) => {
            let n = n.to_lowercase();
            summaries.iter().position(|s| s.name.to_lowercase().contains(&n))
        }
    };
    match pos {
        Some(i) => {
            let adapter = adapters.into_iter().nth(i).expect("index checked above");
            Ok((adapter, summaries[i].clone()))
        }
        None => Err(Error::AdapterNotFound {
            selector: selector.to_string(),
            available: summaries.iter().map(|s| s.to_string()).collect::<Vec<_>>().join("; "),
        }),
    }
}

/// Falls back to GL only when the user did not restrict the backends themselves.
fn instance_allows_gl_fallback() -> bool {
    std::env::var_os("WGPU_BACKEND").is_none()
}

fn matches_any(adapters: &[wgpu::Adapter], selector: &AdapterSelector) -> bool {
    adapters.iter().any(|a| {
        let i = a.get_info();
        match selector {
            AdapterSelector::Auto => true,
            AdapterSelector::Index(_) => false,
            AdapterSelector::Type(t) => i.device_type == *t,
            AdapterSelector::Backend(b) => i.backend == *b,
            AdapterSelector::Name(n) => i.name.to_lowercase().contains(&n.to_lowercase()),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selectors_parse() {
        assert_eq!("".parse::<AdapterSelector>().unwrap(), AdapterSelector::Auto);
        assert_eq!("2".parse::<AdapterSelector>().unwrap(), AdapterSelector::Index(2));
        assert_eq!("type:cpu".parse::<AdapterSelector>().unwrap(), AdapterSelector::Type(wgpu::DeviceType::Cpu));
        assert_eq!(
            "backend:vulkan".parse::<AdapterSelector>().unwrap(),
            AdapterSelector::Backend(wgpu::Backend::Vulkan)
        );
        assert_eq!("llvmpipe".parse::<AdapterSelector>().unwrap(), AdapterSelector::Name("llvmpipe".into()));
        assert!(matches!("type:tpu".parse::<AdapterSelector>(), Err(Error::BadSelector(_))));
        assert!(matches!("foo:bar".parse::<AdapterSelector>(), Err(Error::BadSelector(_))));
    }
}
