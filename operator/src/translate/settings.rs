//! Mesh-wide settings translate needs besides the model: flags, overridden by the
//! MeshConfig in effect.

use std::time::Duration;

use crate::index::{MeshModel, parse_gateway_duration};
use weft_crds::telemetry::TelemetrySettings;
use weft_crds::{AccessPolicy, EscapedSlashesPolicy, MtlsPolicy};

/// How long a sidecar waits for the first bytes of a connection to an undeclared port
/// before treating it as TCP: long enough for a client on a slow link to send its
/// request line, short enough that a server-first protocol's banner is not noticeably
/// late (Linkerd waits 10 s; Istio leaves such ports broken unless declared).
pub const DEFAULT_DETECTION_TIMEOUT: Duration = Duration::from_secs(1);

/// How meshed workloads accept inbound traffic.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum MtlsMode {
    /// Only mutual TLS from the mesh's trust domain.
    #[default]
    Strict,
    /// Mutual TLS and plaintext on the same port (told apart by TLS inspection).
    Permissive,
}

/// Whether meshed workloads need a TrafficTarget to be reached.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum AccessMode {
    /// Only what TrafficTargets grant is allowed (SMI access control; the default).
    #[default]
    DenyByDefault,
    /// Every meshed caller is allowed (mutual TLS still applies), for adoption.
    Permissive,
}

impl AccessMode {
    /// The name used by the CLI and status output.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::DenyByDefault => "deny-by-default",
            Self::Permissive => "permissive",
        }
    }
}

impl MtlsMode {
    /// The name used by the CLI and status output.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Strict => "strict",
            Self::Permissive => "permissive",
        }
    }
}

/// Mesh-wide settings translate needs besides the model.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MeshConfig {
    /// Trust domain of SPIFFE IDs.
    pub trust_domain: String,
    /// Inbound mTLS mode.
    pub mtls: MtlsMode,
    /// Authorization mode.
    pub access: AccessMode,
    /// Protocol detection timeout on undeclared ports; zero treats them as TCP.
    pub detection_timeout: Duration,
    /// What happens to escaped slashes in request paths.
    pub escaped_slashes: EscapedSlashesPolicy,
    /// Access logs and tracing (MeshConfig `telemetry`; defaults when unset).
    pub telemetry: TelemetrySettings,
}

impl Default for MeshConfig {
    fn default() -> Self {
        Self {
            trust_domain: crate::identity::DEFAULT_TRUST_DOMAIN.to_string(),
            mtls: MtlsMode::Strict,
            access: AccessMode::DenyByDefault,
            detection_timeout: DEFAULT_DETECTION_TIMEOUT,
            escaped_slashes: EscapedSlashesPolicy::UnescapeAndRedirect,
            telemetry: TelemetrySettings::default(),
        }
    }
}

impl MeshConfig {
    /// This configuration with the overrides of the model's MeshConfig, if any.
    pub fn effective(&self, model: &MeshModel) -> MeshConfig {
        let mut config = self.clone();
        let Some(settings) = &model.settings else {
            return config;
        };
        if let Some(access) = settings.spec.access {
            config.access = match access {
                AccessPolicy::DenyByDefault => AccessMode::DenyByDefault,
                AccessPolicy::Permissive => AccessMode::Permissive,
            };
        }
        if let Some(mtls) = settings.spec.mtls {
            config.mtls = match mtls {
                MtlsPolicy::Strict => MtlsMode::Strict,
                MtlsPolicy::Permissive => MtlsMode::Permissive,
            };
        }
        // The index reported an unparsable timeout and dropped it.
        if let Some(timeout) = settings
            .spec
            .protocol_detection_timeout
            .as_deref()
            .and_then(|t| parse_gateway_duration(t).ok())
        {
            config.detection_timeout = timeout;
        }
        if let Some(policy) = settings.spec.escaped_slashes {
            config.escaped_slashes = policy;
        }
        if let Some(telemetry) = &settings.spec.telemetry {
            config.telemetry = telemetry.clone();
        }
        config
    }
}
