//! The user namespace part of a container's plan (`linux.namespaces` type
//! user, `linux.uidMappings`, `linux.gidMappings`): the mappings checked the
//! way the kernel will check them, so `create`, not `start`, fails on them.
//! How the agent makes the namespace is the binary's `userns` module.

use super::fs::GuestFs;
use super::SpecError;
use oci_spec::runtime::LinuxIdMapping;
use std::ffi::CString;

/// The kernel's limit on lines in uid_map / gid_map.
const MAX_EXTENTS: usize = 340;

/// One line of a uid or gid map: `size` ids from `container` on map to
/// ids from `host` on in the parent (the guest's initial) namespace.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IdMap {
    pub container: u32,
    pub host: u32,
    pub size: u32,
}

/// How the container gets its user namespace.
#[derive(Debug)]
pub enum UserNs {
    /// The agent's (the guest's initial) user namespace.
    Inherit,
    /// A new one with these mappings.
    New { uid: Vec<IdMap>, gid: Vec<IdMap> },
    /// An existing one (`path`); the child joins it first.
    Join(CString),
}

impl UserNs {
    /// Container id → id in the guest's initial namespace. Ids of a joined
    /// namespace whose mappings are unknown are taken as they are.
    pub fn host_ids(&self, uid: u32, gid: u32, fs: &dyn GuestFs) -> Option<(u32, u32)> {
        match self {
            UserNs::New { uid: u, gid: g } => Some((map_id(u, uid)?, map_id(g, gid)?)),
            UserNs::Join(path) => {
                match (
                    joined_map(path, "uid_map", fs),
                    joined_map(path, "gid_map", fs),
                ) {
                    (Some(u), Some(g)) => Some((map_id(&u, uid)?, map_id(&g, gid)?)),
                    _ => Some((uid, gid)),
                }
            }
            UserNs::Inherit => Some((uid, gid)),
        }
    }
}

/// The maps of a namespace joined by a `/proc/<pid>/ns/user` path (read
/// from `/proc/<pid>/<file>`); None for other paths.
fn joined_map(path: &CString, file: &str, fs: &dyn GuestFs) -> Option<Vec<IdMap>> {
    use std::os::unix::ffi::OsStrExt;
    let ns = std::path::Path::new(std::ffi::OsStr::from_bytes(path.as_bytes()));
    parse_id_map(&fs.read_to_string(&ns.parent()?.parent()?.join(file))?)
}

/// The id `id` maps to, if a line covers it.
pub fn map_id(maps: &[IdMap], id: u32) -> Option<u32> {
    maps.iter().find_map(|m| {
        let offset = id.checked_sub(m.container)?;
        (offset < m.size).then(|| m.host + offset)
    })
}

/// The text written to uid_map / gid_map: one "container host size" line
/// per mapping, all in one write as the kernel requires.
pub fn map_text(maps: &[IdMap]) -> String {
    maps.iter()
        .map(|m| format!("{} {} {}\n", m.container, m.host, m.size))
        .collect()
}

/// Parses the text of /proc/<pid>/uid_map or gid_map.
pub fn parse_id_map(text: &str) -> Option<Vec<IdMap>> {
    text.lines()
        .map(|l| {
            let mut f = l.split_whitespace().map(str::parse::<u32>);
            Some(IdMap {
                container: f.next()?.ok()?,
                host: f.next()?.ok()?,
                size: f.next()?.ok()?,
            })
        })
        .collect()
}

/// Validates a spec's mappings the way the kernel will (so `create`, not
/// `start`, fails on them): at most 340 lines, no empty or wrapping
/// range, no two ranges overlapping on either side.
pub fn maps_from_spec(field: &str, spec: &[LinuxIdMapping]) -> Result<Vec<IdMap>, SpecError> {
    if spec.len() > MAX_EXTENTS {
        return Err(SpecError::Invalid(format!(
            "{field}: {} mappings, the kernel takes at most {MAX_EXTENTS}",
            spec.len()
        )));
    }
    let mut maps: Vec<IdMap> = Vec::with_capacity(spec.len());
    for (i, m) in spec.iter().enumerate() {
        let map = IdMap {
            container: m.container_id(),
            host: m.host_id(),
            size: m.size(),
        };
        // The kernel refuses a range that wraps past 2^32-1.
        let fits = |first: u32| first.checked_add(map.size).is_some();
        if map.size == 0 || !fits(map.container) || !fits(map.host) {
            return Err(SpecError::Invalid(format!(
                "{field}[{i}]: containerID {} hostID {} size {} is empty or runs past 2^32-1",
                map.container, map.host, map.size
            )));
        }
        // Nor ranges that overlap, on either side.
        let overlap = |a: u32, b: u32, b_size: u32| {
            u64::from(a) < u64::from(b) + u64::from(b_size)
                && u64::from(b) < u64::from(a) + u64::from(map.size)
        };
        if let Some(j) = maps.iter().position(|p| {
            overlap(map.container, p.container, p.size) || overlap(map.host, p.host, p.size)
        }) {
            return Err(SpecError::Invalid(format!(
                "{field}[{i}] overlaps {field}[{j}]"
            )));
        }
        maps.push(map);
    }
    Ok(maps)
}

/// The user namespace part of a container's plan, from `linux`: `decl` is
/// what `linux.namespaces` says (None: no user namespace; Some(None): a new
/// one; Some(Some(path)): join). Mappings without a user namespace, a new
/// one without mappings, and a `process.user` the mappings do not cover
/// are refused, naming the field.
pub fn plan(
    linux: &oci_spec::runtime::Linux,
    decl: Option<Option<CString>>,
    process: &oci_spec::runtime::Process,
    fs: &dyn GuestFs,
) -> Result<UserNs, SpecError> {
    let uid_spec = linux.uid_mappings().as_deref();
    let gid_spec = linux.gid_mappings().as_deref();
    let given = |m: Option<&[LinuxIdMapping]>| m.is_some_and(|m| !m.is_empty());
    match decl {
        None => {
            for (field, m) in [
                ("linux.uidMappings", uid_spec),
                ("linux.gidMappings", gid_spec),
            ] {
                if given(m) {
                    return Err(SpecError::Invalid(format!(
                        "{field}: mappings need a user namespace, and linux.namespaces has \
                         none of type user"
                    )));
                }
            }
            Ok(UserNs::Inherit)
        }
        Some(Some(path)) => {
            if given(uid_spec) || given(gid_spec) {
                // runc accepts mappings next to a path only when they are
                // the joined namespace's own; check that where they can be
                // read (/proc/<pid>/ns/user).
                for (field, m, name) in [
                    ("linux.uidMappings", uid_spec, "uid_map"),
                    ("linux.gidMappings", gid_spec, "gid_map"),
                ] {
                    let want = maps_from_spec(field, m.unwrap_or(&[]))?;
                    if joined_map(&path, name, fs).as_deref() != Some(&want[..]) {
                        return Err(SpecError::Invalid(format!(
                            "{field}: the user namespace is joined by path (linux.namespaces), \
                             whose own mappings apply; these differ or cannot be read"
                        )));
                    }
                }
            }
            Ok(UserNs::Join(path))
        }
        Some(None) => {
            let uid = maps_from_spec("linux.uidMappings", uid_spec.unwrap_or(&[]))?;
            let gid = maps_from_spec("linux.gidMappings", gid_spec.unwrap_or(&[]))?;
            for (field, maps) in [("linux.uidMappings", &uid), ("linux.gidMappings", &gid)] {
                if maps.is_empty() {
                    return Err(SpecError::Invalid(format!(
                        "{field}: a new user namespace (linux.namespaces) needs mappings: \
                         without them no id, root included, exists in it"
                    )));
                }
            }
            // The set-up runs as the namespace's root (see the binary's `child` module).
            if map_id(&uid, 0).is_none() || map_id(&gid, 0).is_none() {
                return Err(SpecError::Invalid(
                    "linux.uidMappings / linux.gidMappings: container uid and gid 0 must be \
                     mapped (the container is set up as the root of its user namespace, as \
                     runc does)"
                        .into(),
                ));
            }
            let user = process.user();
            if map_id(&uid, user.uid()).is_none() {
                return Err(SpecError::Invalid(format!(
                    "process.user.uid {} is not mapped by linux.uidMappings",
                    user.uid()
                )));
            }
            for g in
                std::iter::once(user.gid()).chain(user.additional_gids().iter().flatten().copied())
            {
                if map_id(&gid, g).is_none() {
                    return Err(SpecError::Invalid(format!(
                        "process.user gid {g} is not mapped by linux.gidMappings"
                    )));
                }
            }
            Ok(UserNs::New { uid, gid })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::fs::MapFs;

    fn linux(json: serde_json::Value) -> oci_spec::runtime::Linux {
        serde_json::from_value(json).unwrap()
    }

    fn process(uid: u32, gid: u32, extra: &[u32]) -> oci_spec::runtime::Process {
        serde_json::from_value(serde_json::json!({
            "user": {"uid": uid, "gid": gid, "additionalGids": extra},
            "args": ["sh"], "cwd": "/"
        }))
        .unwrap()
    }

    fn mapping(c: u32, h: u32, s: u32) -> serde_json::Value {
        serde_json::json!({"containerID": c, "hostID": h, "size": s})
    }

    #[test]
    fn ids_map_through_the_ranges() {
        let maps = [
            IdMap {
                container: 0,
                host: 1000,
                size: 10,
            },
            IdMap {
                container: 100,
                host: 5000,
                size: 1,
            },
        ];
        assert_eq!(map_id(&maps, 0), Some(1000));
        assert_eq!(map_id(&maps, 9), Some(1009));
        assert_eq!(map_id(&maps, 10), None);
        assert_eq!(map_id(&maps, 100), Some(5000));
        assert_eq!(map_text(&maps), "0 1000 10\n100 5000 1\n");
    }

    #[test]
    fn a_new_user_namespace_gets_validated_mappings() {
        let l = linux(serde_json::json!({
            "uidMappings": [mapping(0, 1000, 65536)],
            "gidMappings": [mapping(0, 1000, 65536)]
        }));
        match plan(&l, Some(None), &process(0, 0, &[5]), &MapFs::new()).unwrap() {
            UserNs::New { uid, gid } => {
                assert_eq!(
                    uid,
                    vec![IdMap {
                        container: 0,
                        host: 1000,
                        size: 65536
                    }]
                );
                assert_eq!(gid.len(), 1);
            }
            _ => panic!("not a new user namespace"),
        }
    }

    #[test]
    fn bad_user_namespace_specs_name_the_field() {
        let both = serde_json::json!({
            "uidMappings": [mapping(0, 1000, 10)],
            "gidMappings": [mapping(0, 1000, 10)]
        });
        let cases: Vec<(
            serde_json::Value,
            Option<Option<CString>>,
            oci_spec::runtime::Process,
            &str,
        )> = vec![
            // Mappings without a user namespace.
            (both.clone(), None, process(0, 0, &[]), "linux.uidMappings"),
            (
                serde_json::json!({"gidMappings": [mapping(0, 1000, 10)]}),
                None,
                process(0, 0, &[]),
                "linux.gidMappings",
            ),
            // A new user namespace without mappings.
            (
                serde_json::json!({}),
                Some(None),
                process(0, 0, &[]),
                "linux.uidMappings",
            ),
            (
                serde_json::json!({"uidMappings": [mapping(0, 1000, 10)]}),
                Some(None),
                process(0, 0, &[]),
                "linux.gidMappings",
            ),
            // Bad ranges.
            (
                serde_json::json!({"uidMappings": [mapping(0, 1000, 0)], "gidMappings": [mapping(0, 1000, 1)]}),
                Some(None),
                process(0, 0, &[]),
                "linux.uidMappings[0]",
            ),
            (
                serde_json::json!({"uidMappings": [mapping(0, u32::MAX - 1, 2)], "gidMappings": [mapping(0, 1000, 1)]}),
                Some(None),
                process(0, 0, &[]),
                "linux.uidMappings[0]",
            ),
            (
                serde_json::json!({"uidMappings": [mapping(0, 1000, 10), mapping(5, 2000, 10)], "gidMappings": [mapping(0, 1000, 1)]}),
                Some(None),
                process(0, 0, &[]),
                "linux.uidMappings[1] overlaps",
            ),
            (
                serde_json::json!({"uidMappings": [mapping(0, 1000, 10), mapping(50, 1005, 1)], "gidMappings": [mapping(0, 1000, 1)]}),
                Some(None),
                process(0, 0, &[]),
                "linux.uidMappings[1] overlaps",
            ),
            // Root not mapped: the set-up runs as the namespace's root.
            (
                serde_json::json!({"uidMappings": [mapping(1, 1000, 10)], "gidMappings": [mapping(0, 1000, 10)]}),
                Some(None),
                process(1, 0, &[]),
                "uid and gid 0 must be mapped",
            ),
            // process.user outside the mappings.
            (
                both.clone(),
                Some(None),
                process(10, 0, &[]),
                "process.user.uid 10",
            ),
            (both.clone(), Some(None), process(0, 0, &[42]), "gid 42"),
        ];
        for (l, decl, p, want) in cases {
            let err = match plan(&linux(l.clone()), decl, &p, &MapFs::new()) {
                Err(e) => e.to_string(),
                Ok(_) => panic!("{l} was accepted"),
            };
            assert!(err.contains(want), "{l}: {err}");
        }
    }

    #[test]
    fn proc_maps_parse() {
        assert_eq!(
            parse_id_map("         0       1000      65536\n"),
            Some(vec![IdMap {
                container: 0,
                host: 1000,
                size: 65536
            }])
        );
    }
}
