//! The runtime options containerd's CRI plugin passes with a new task
//! (`CreateTaskRequest.options`): `runtimeoptions.v1.Options`, whose
//! `config_path` names the husk config file of the VM. The message is
//! generated from proto/runtimeoptions.proto (build.rs); containerd-shim-protos
//! does not ship it.

use crate::error::TaskError;
use protobuf::Message;

mod generated {
    include!(concat!(env!("OUT_DIR"), "/runtimeoptions/mod.rs"));
}

pub use generated::runtimeoptions::Options;

/// The `Any` type name of [`Options`].
pub const TYPE_NAME: &str = "runtimeoptions.v1.Options";

/// The config file an encoded [`Options`] names; empty when it names none.
/// Fields other than `type_url` and `config_path` are ignored.
pub fn config_path(bytes: &[u8]) -> Result<String, TaskError> {
    let options = Options::parse_from_bytes(bytes)
        .map_err(|e| TaskError::RuntimeOptions(format!("{TYPE_NAME} does not decode: {e}")))?;
    Ok(options.config_path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_config_path_of_encoded_options_is_read_back() {
        let options = Options {
            type_url: "io.containerd.husk.v2.config".into(),
            config_path: "/etc/husk/pod.toml".into(),
            ..Default::default()
        };
        let bytes = options.write_to_bytes().unwrap();
        assert_eq!(config_path(&bytes).unwrap(), "/etc/husk/pod.toml");
        // No options set: no config file named.
        assert_eq!(config_path(&[]).unwrap(), "");
    }

    #[test]
    fn fields_husk_does_not_read_are_ignored() {
        let mut bytes = Options {
            config_path: "/etc/husk/pod.toml".into(),
            ..Default::default()
        }
        .write_to_bytes()
        .unwrap();
        // Field 3, a string (containerd's newer config_body), then field
        // 9, a varint.
        bytes.extend_from_slice(&[26, 3, b'a', b'=', b'1', 72, 1]);
        assert_eq!(config_path(&bytes).unwrap(), "/etc/husk/pod.toml");
    }

    #[test]
    fn malformed_options_are_refused_naming_the_message() {
        // config_path announced 10 bytes long, 3 there; then a wire type
        // (7) that does not exist.
        for bytes in [&[18u8, 10, b'/', b'e', b't'][..], &[15u8, 0][..]] {
            let e = config_path(bytes).unwrap_err();
            assert!(e.to_string().contains(TYPE_NAME), "{e}");
            assert_eq!(e.code(), ttrpc::Code::INVALID_ARGUMENT);
        }
    }
}
