//! Rooms: what one WebSocket subscriber receives, how it changes that over
//! the socket, and the per-shard index that finds a committed event's
//! subscribers.
//!
//! # What a subscriber selects
//!
//! A [`Selection`] is (devices ∪ prefixes) × types: an event is pushed when
//! its `device_id` is one of the devices or starts with one of the prefixes,
//! and its `type` is one of the types. The URL of `GET /ws` gives the first
//! selection (`device_id`, `device_prefix`, `type`, each repeatable, values
//! accumulating); control frames change it afterwards.
//!
//! - No `device_id` and no `device_prefix` in the URL: every device (held as
//!   the prefix `""`, or the token's `device_prefix`). This is a *default*:
//!   the first subscribe frame naming devices or prefixes replaces it, so a
//!   dashboard that opens `/ws` and joins a room gets that room only. The
//!   prefix `""`, named explicitly, is every device and is kept like any room.
//! - No `type` in the URL: every type, until a subscribe frame names types;
//!   `"every_type": true` goes back to every type.
//! - Unsubscribing the last room (or type) leaves a socket that receives
//!   nothing; it stays open, may still ingest, and may subscribe again.
//! - A token's `device_prefix` (the *scope*) bounds everything: a device or
//!   prefix outside it is refused (403 at the upgrade, an error answer in a
//!   frame), so the index never needs to check the scope per event.
//!
//! # Control frames
//!
//! A text frame holding a JSON object with an `"op"` key and no
//! `"device_id"` key is a control frame ([`classify`]); anything else is an
//! ingest frame as before (an event must have a `device_id`, so no frame that
//! could be stored is taken for a control frame, even with
//! `ingest.allow_unknown_fields`). `{"op": "subscribe" | "unsubscribe", "id":
//! …, "devices": […], "prefixes": […], "types": […], "every_type": true,
//! "snapshot": bool}` is answered `{"op": …, "id": …, "ok": true, "devices":
//! N, "prefixes": N, "types": N, "every_type": bool}` with what the socket
//! now holds, or `{"op": …, "id": …, "ok": false, "error": "…"}` naming the
//! field to fix; a frame is applied whole or not at all. Control frames do
//! not count in the ingest answers' `seq`.
//!
//! # Why an index
//!
//! A shard may own 100,000 subscribers, most in rooms of one device. Offering
//! each event to each subscriber would cost events × subscribers; [`Rooms`]
//! instead maps each device and each prefix to the subscribers holding it,
//! and keeps the set of prefix lengths in use, so an event costs one lookup
//! for its device, one per distinct prefix length, and a type check per
//! subscriber found — proportional to the subscribers it matches, not to
//! those it does not. The index belongs to one shard and is touched by that
//! shard's thread only: no lock, no atomic.

use std::cell::{Cell, Ref, RefCell};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::rc::Rc;

use serde_json::{Map, Value};

use crate::ingest::event::{MAX_ID_BYTES, MAX_TYPE_BYTES};

/// How much one socket may hold, from `[websocket]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RoomLimits {
    pub max_devices: usize,
    pub max_prefixes: usize,
    pub max_types: usize,
    pub max_control_frame_bytes: usize,
}

/// What one subscriber receives; see the module docs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Selection {
    pub devices: BTreeSet<Box<str>>,
    pub prefixes: BTreeSet<Box<str>>,
    /// Empty while `every_type`.
    pub types: BTreeSet<Box<str>>,
    /// Every type (no type named yet, or `"every_type": true`).
    pub every_type: bool,
    /// The device side is the URL's default (every device in scope, held as
    /// the prefix `scope`), replaced by the first subscribe naming rooms.
    pub every_device: bool,
    /// The token's `device_prefix`, `""` without one.
    pub scope: Box<str>,
}

/// Estimated heap bytes of one entry of a selection and its index entries.
const ENTRY_OVERHEAD_BYTES: usize = 160;

impl Selection {
    /// The selection of a URL's `device_id`, `device_prefix` and `type`
    /// values, within `scope`.
    pub fn new(scope: &str, devices: &[Box<str>], prefixes: &[Box<str>], types: &[Box<str>]) -> Selection {
        let every_device = devices.is_empty() && prefixes.is_empty();
        let mut prefixes: BTreeSet<Box<str>> = prefixes.iter().cloned().collect();
        if every_device {
            prefixes.insert(scope.into());
        }
        Selection {
            devices: devices.iter().cloned().collect(),
            prefixes,
            every_type: types.is_empty(),
            types: types.iter().cloned().collect(),
            every_device,
            scope: scope.into(),
        }
    }

    pub fn takes_type(&self, kind: &str) -> bool {
        self.every_type || self.types.contains(kind)
    }

    /// The rule the index implements, spelled out (for tests).
    pub fn matches(&self, device: &str, kind: &str) -> bool {
        (self.devices.contains(device) || self.prefixes.iter().any(|p| device.starts_with(&**p)))
            && self.takes_type(kind)
    }

    /// What it holds in memory, for the memory budget.
    pub fn memory_bytes(&self) -> usize {
        self.devices.iter().chain(&self.prefixes).chain(&self.types).map(|s| s.len() + ENTRY_OVERHEAD_BYTES).sum()
    }

    /// Refuses a selection past the socket's bounds, naming the config key.
    pub fn check_bounds(&self, limits: &RoomLimits) -> Result<(), String> {
        let over = |what: &str, n: usize, max: usize, key: &str| {
            (n > max).then(|| format!("{what}: {n} on this socket, more than websocket.{key} ({max})"))
        };
        let error = over("devices", self.devices.len(), limits.max_devices, "max_devices_per_socket")
            .or_else(|| over("prefixes", self.prefixes.len(), limits.max_prefixes, "max_prefixes_per_socket"))
            .or_else(|| over("types", self.types.len(), limits.max_types, "max_types_per_socket"));
        error.map_or(Ok(()), Err)
    }

    /// The result of applying a control frame, or why it is refused (the
    /// selection is then unchanged).
    pub fn apply(&self, c: &Control, limits: &RoomLimits) -> Result<Selection, String> {
        let mut next = self.clone();
        match c.op {
            Op::Subscribe => {
                for (field, names) in [("devices", &c.devices), ("prefixes", &c.prefixes)] {
                    if let Some((i, name)) = names.iter().enumerate().find(|(_, n)| !n.starts_with(&*self.scope)) {
                        return Err(format!(
                            "{field}[{i}] {name:?} is outside this token's device_prefix {:?}",
                            self.scope
                        ));
                    }
                }
                if next.every_device && !(c.devices.is_empty() && c.prefixes.is_empty()) {
                    next.prefixes.clear();
                    next.every_device = false;
                }
                next.devices.extend(c.devices.iter().cloned());
                next.prefixes.extend(c.prefixes.iter().cloned());
                if c.every_type {
                    next.types.clear();
                    next.every_type = true;
                } else if !c.types.is_empty() {
                    next.every_type = false;
                    next.types.extend(c.types.iter().cloned());
                }
            }
            Op::Unsubscribe => {
                let before = (next.devices.len(), next.prefixes.len());
                for d in &c.devices {
                    next.devices.remove(d);
                }
                for p in &c.prefixes {
                    next.prefixes.remove(p);
                }
                if before != (next.devices.len(), next.prefixes.len()) {
                    next.every_device = false;
                }
                for t in &c.types {
                    next.types.remove(t);
                }
            }
        }
        next.check_bounds(limits)?;
        Ok(next)
    }

    /// The first device or prefix outside `scope`, described, if any.
    pub fn outside(devices: &[Box<str>], prefixes: &[Box<str>], scope: &str) -> Option<String> {
        let device = devices.iter().find(|d| !d.starts_with(scope)).map(|d| format!("device_id {d:?}"));
        device.or_else(|| prefixes.iter().find(|p| !p.starts_with(scope)).map(|p| format!("device_prefix {p:?}")))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Subscribe,
    Unsubscribe,
}

impl Op {
    fn name(self) -> &'static str {
        match self {
            Op::Subscribe => "subscribe",
            Op::Unsubscribe => "unsubscribe",
        }
    }
}

/// A parsed control frame.
#[derive(Debug, Clone, PartialEq)]
pub struct Control {
    pub op: Op,
    /// Echoed in the answer so the client can pair them (string or number).
    pub id: Option<Value>,
    pub devices: Vec<Box<str>>,
    pub prefixes: Vec<Box<str>>,
    pub types: Vec<Box<str>>,
    pub every_type: bool,
    /// `"snapshot": true`: the current state of the rooms first (see
    /// `snapshot`; the session sends it after the answer).
    pub snapshot: bool,
}

impl Control {
    /// `{"op":…,"id":…,"ok":true,…counts}` for the selection now held.
    pub fn answer(&self, now: &Selection) -> String {
        let mut a = Map::new();
        a.insert("op".into(), self.op.name().into());
        if let Some(id) = &self.id {
            a.insert("id".into(), id.clone());
        }
        a.insert("ok".into(), true.into());
        a.insert("devices".into(), now.devices.len().into());
        a.insert("prefixes".into(), now.prefixes.len().into());
        a.insert("types".into(), now.types.len().into());
        a.insert("every_type".into(), now.every_type.into());
        Value::Object(a).to_string()
    }

    pub fn refuse(&self, error: impl Into<String>) -> ControlError {
        ControlError { op: self.op.name().into(), id: self.id.clone(), error: error.into() }
    }
}

/// A control frame refused: answered `{"op":…,"id":…,"ok":false,"error":…}`.
#[derive(Debug, Clone, PartialEq)]
pub struct ControlError {
    /// The `op` as sent (`null` when it was not a string).
    pub op: Value,
    pub id: Option<Value>,
    pub error: String,
}

impl ControlError {
    pub fn answer(&self) -> String {
        let mut a = Map::new();
        a.insert("op".into(), self.op.clone());
        if let Some(id) = &self.id {
            a.insert("id".into(), id.clone());
        }
        a.insert("ok".into(), false.into());
        a.insert("error".into(), self.error.clone().into());
        Value::Object(a).to_string()
    }
}

/// Why a snapshot cannot be had with `[state]` off (for the URL and for frames).
pub const SNAPSHOT_NEEDS_STATE: &str =
    "snapshot is not available: it needs the latest-state table ([state] enabled = true)";

/// `None` for an ingest frame; a control frame parsed or refused otherwise.
/// Ingest frames pay one substring search (and a key scan only when an
/// `"op"` appears in them).
pub fn classify(text: &str, max_control_frame_bytes: usize) -> Option<Result<Control, ControlError>> {
    if !text.trim_start().starts_with('{') || !text.contains("\"op\"") {
        return None;
    }
    #[derive(serde::Deserialize)]
    struct Probe {
        op: Option<serde::de::IgnoredAny>,
        device_id: Option<serde::de::IgnoredAny>,
    }
    let refused = |error: String| Some(Err(ControlError { op: Value::Null, id: None, error }));
    match serde_json::from_str::<Probe>(text) {
        Ok(Probe { op: Some(_), device_id: None }) => {}
        Ok(_) => return None,
        // Not JSON (or a repeated key): a control frame if it looks like one.
        Err(_) if text.contains("\"device_id\"") => return None,
        Err(e) => return refused(format!("control frame is not valid JSON: {e}")),
    }
    if text.len() > max_control_frame_bytes {
        return refused(format!(
            "control frame is {} bytes, more than websocket.max_control_frame_bytes ({max_control_frame_bytes})",
            text.len()
        ));
    }
    let Ok(Value::Object(map)) = serde_json::from_str::<Value>(text) else {
        return refused("control frame is not a JSON object".into());
    };
    Some(parse_control(map))
}

fn parse_control(map: Map<String, Value>) -> Result<Control, ControlError> {
    let id = map.get("id").cloned();
    let op_value = map.get("op").cloned().unwrap_or(Value::Null);
    let fail = |error: String| ControlError { op: op_value.clone(), id: id.clone(), error };
    if id.as_ref().is_some_and(|v| !(v.is_string() || v.is_number())) {
        return Err(ControlError { id: None, ..fail("id must be a string or a number".into()) });
    }
    let op = match op_value.as_str() {
        Some("subscribe") => Op::Subscribe,
        Some("unsubscribe") => Op::Unsubscribe,
        _ => return Err(fail(format!("op must be \"subscribe\" or \"unsubscribe\", not {op_value}"))),
    };
    let mut c = Control {
        op,
        id: id.clone(),
        devices: Vec::new(),
        prefixes: Vec::new(),
        types: Vec::new(),
        every_type: false,
        snapshot: false,
    };
    for (key, value) in &map {
        match key.as_str() {
            "op" | "id" => {}
            "devices" => c.devices = names(key, value, 1, MAX_ID_BYTES).map_err(fail)?,
            "prefixes" => c.prefixes = names(key, value, 0, MAX_ID_BYTES).map_err(fail)?,
            "types" => c.types = names(key, value, 1, MAX_TYPE_BYTES).map_err(fail)?,
            "every_type" | "snapshot" => {
                let Some(b) = value.as_bool() else {
                    return Err(fail(format!("{key} must be true or false")));
                };
                if op == Op::Unsubscribe && b {
                    return Err(fail(format!("{key} goes with subscribe only")));
                }
                if key == "every_type" {
                    c.every_type = b;
                } else {
                    c.snapshot = b;
                }
            }
            other => {
                return Err(fail(format!(
                    "unknown field `{}`; allowed: op, id, devices, prefixes, types, every_type, snapshot",
                    other.escape_debug()
                )));
            }
        }
    }
    if c.every_type && !c.types.is_empty() {
        return Err(fail("every_type and types do not go together; send one".into()));
    }
    Ok(c)
}

/// A JSON array of strings of `min..=max` bytes.
fn names(key: &str, value: &Value, min: usize, max: usize) -> Result<Vec<Box<str>>, String> {
    let Some(items) = value.as_array() else {
        return Err(format!("{key} must be an array of strings"));
    };
    items
        .iter()
        .enumerate()
        .map(|(i, item)| {
            let Some(s) = item.as_str() else {
                return Err(format!("{key}[{i}] must be a string"));
            };
            if s.len() < min || s.len() > max {
                return Err(format!("{key}[{i}] must be {min}-{max} bytes"));
            }
            Ok(s.into())
        })
        .collect()
}

struct Member<T> {
    value: T,
    selection: RefCell<Selection>,
    /// The last event this member was offered, so that a subscriber found
    /// through several rooms gets an event once.
    seen: Cell<u64>,
}

type Holders<T> = HashMap<u64, Rc<Member<T>>>;

/// One shard's subscribers, indexed by device and by prefix.
pub struct Rooms<T> {
    members: Holders<T>,
    by_device: HashMap<Box<str>, Holders<T>>,
    by_prefix: HashMap<Box<str>, Holders<T>>,
    /// Length → prefixes of that length in `by_prefix`.
    prefix_lens: BTreeMap<usize, usize>,
    /// Events offered so far (for `Member::seen`).
    events: Cell<u64>,
}

impl<T> Default for Rooms<T> {
    fn default() -> Self {
        Self {
            members: HashMap::new(),
            by_device: HashMap::new(),
            by_prefix: HashMap::new(),
            prefix_lens: BTreeMap::new(),
            events: Cell::new(0),
        }
    }
}

impl<T> Rooms<T> {
    pub fn len(&self) -> usize {
        self.members.len()
    }

    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    /// Every member, e.g. to tell all of them about missed events.
    pub fn values(&self) -> impl Iterator<Item = &T> {
        self.members.values().map(|m| &m.value)
    }

    pub fn insert(&mut self, id: u64, value: T, selection: Selection) {
        self.remove(id);
        let member = Rc::new(Member { value, selection: RefCell::new(selection), seen: Cell::new(0) });
        let s = member.selection.borrow();
        for d in &s.devices {
            self.by_device.entry(d.clone()).or_default().insert(id, member.clone());
        }
        for p in &s.prefixes {
            self.add_prefix(p, id, &member);
        }
        drop(s);
        self.members.insert(id, member);
    }

    pub fn remove(&mut self, id: u64) -> bool {
        let Some(member) = self.members.remove(&id) else { return false };
        let s = member.selection.borrow();
        for d in &s.devices {
            self.drop_device(d, id);
        }
        for p in &s.prefixes {
            self.drop_prefix(p, id);
        }
        true
    }

    pub fn selection(&self, id: u64) -> Option<Ref<'_, Selection>> {
        self.members.get(&id).map(|m| m.selection.borrow())
    }

    /// Replaces a member's selection, touching only the rooms that change.
    pub fn replace(&mut self, id: u64, next: Selection) {
        let Some(member) = self.members.get(&id).cloned() else { return };
        let old = member.selection.replace(next);
        let new = member.selection.borrow();
        for d in old.devices.difference(&new.devices) {
            self.drop_device(d, id);
        }
        for d in new.devices.difference(&old.devices) {
            self.by_device.entry(d.clone()).or_default().insert(id, member.clone());
        }
        for p in old.prefixes.difference(&new.prefixes) {
            self.drop_prefix(p, id);
        }
        for p in new.prefixes.difference(&old.prefixes) {
            self.add_prefix(p, id, &member);
        }
    }

    /// Calls `f` once for every member whose selection takes this event.
    pub fn for_each_match(&self, device: &str, kind: &str, mut f: impl FnMut(&T)) {
        let stamp = self.events.get() + 1;
        self.events.set(stamp);
        let mut visit = |holders: &Holders<T>| {
            for m in holders.values() {
                if m.seen.replace(stamp) != stamp && m.selection.borrow().takes_type(kind) {
                    f(&m.value);
                }
            }
        };
        if let Some(holders) = self.by_device.get(device) {
            visit(holders);
        }
        for &len in self.prefix_lens.range(..=device.len()).map(|(len, _)| len) {
            if let Some(holders) = device.get(..len).and_then(|p| self.by_prefix.get(p)) {
                visit(holders);
            }
        }
    }

    fn add_prefix(&mut self, p: &str, id: u64, member: &Rc<Member<T>>) {
        let holders = self.by_prefix.entry(p.into()).or_insert_with(|| {
            *self.prefix_lens.entry(p.len()).or_default() += 1;
            HashMap::new()
        });
        holders.insert(id, member.clone());
    }

    fn drop_device(&mut self, d: &str, id: u64) {
        if let Some(holders) = self.by_device.get_mut(d) {
            holders.remove(&id);
            if holders.is_empty() {
                self.by_device.remove(d);
            }
        }
    }

    fn drop_prefix(&mut self, p: &str, id: u64) {
        let Some(holders) = self.by_prefix.get_mut(p) else { return };
        holders.remove(&id);
        if holders.is_empty() {
            self.by_prefix.remove(p);
            if let Some(n) = self.prefix_lens.get_mut(&p.len()) {
                *n -= 1;
                if *n == 0 {
                    self.prefix_lens.remove(&p.len());
                }
            }
        }
    }

    /// Index entries (devices, prefixes, prefix lengths), for tests.
    #[cfg(test)]
    fn shape(&self) -> (usize, usize, usize) {
        (self.by_device.len(), self.by_prefix.len(), self.prefix_lens.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: RoomLimits =
        RoomLimits { max_devices: 4, max_prefixes: 2, max_types: 2, max_control_frame_bytes: 512 };

    fn b(names: &[&str]) -> Vec<Box<str>> {
        names.iter().map(|&n| n.into()).collect()
    }

    fn control(text: &str) -> Control {
        classify(text, 512).expect("a control frame").expect("valid")
    }

    fn refusal(text: &str) -> String {
        classify(text, 512).expect("a control frame").expect_err("refused").error
    }

    fn matches(rooms: &Rooms<u32>, device: &str, kind: &str) -> Vec<u32> {
        let mut out = Vec::new();
        rooms.for_each_match(device, kind, |v| out.push(*v));
        out.sort_unstable();
        out
    }

    #[test]
    fn url_selection_defaults_and_accumulates() {
        let every = Selection::new("", &[], &[], &[]);
        assert!(every.every_device && every.every_type && every.matches("anything", "t"));
        let scoped = Selection::new("fleet/", &[], &[], &[]);
        assert!(scoped.matches("fleet/1", "t") && !scoped.matches("other", "t"));
        let s = Selection::new("", &b(&["a", "b"]), &b(&["p/"]), &b(&["gps", "boot"]));
        assert!(s.matches("a", "gps") && s.matches("p/9", "boot") && !s.matches("c", "gps") && !s.matches("a", "x"));
        assert!(s.check_bounds(&LIMITS).is_ok());
        let many = Selection::new("", &b(&["1", "2", "3", "4", "5"]), &[], &[]);
        assert!(many.check_bounds(&LIMITS).unwrap_err().contains("websocket.max_devices_per_socket (4)"));
        assert_eq!(Selection::outside(&b(&["f/1", "g/1"]), &[], "f/").as_deref(), Some("device_id \"g/1\""));
        assert_eq!(Selection::outside(&b(&["f/1"]), &b(&["f"]), "f/").as_deref(), Some("device_prefix \"f\""));
        assert_eq!(Selection::outside(&b(&["f/1"]), &b(&["f/x"]), "f/"), None);
    }

    #[test]
    fn the_first_room_replaces_the_default_and_leaving_the_last_leaves_nothing() {
        let every = Selection::new("", &[], &[], &[]);
        let room = every.apply(&control(r#"{"op":"subscribe","devices":["a"]}"#), &LIMITS).unwrap();
        assert!(room.matches("a", "t") && !room.matches("b", "t"), "{room:?}");
        let typed = room.apply(&control(r#"{"op":"subscribe","types":["gps"]}"#), &LIMITS).unwrap();
        assert!(typed.matches("a", "gps") && !typed.matches("a", "boot"));
        let more = typed.apply(&control(r#"{"op":"subscribe","prefixes":["p/"],"types":["boot"]}"#), &LIMITS).unwrap();
        assert!(more.matches("a", "boot") && more.matches("p/1", "gps"), "rooms and types accumulate");
        let back = more.apply(&control(r#"{"op":"subscribe","every_type":true}"#), &LIMITS).unwrap();
        assert!(back.every_type && back.matches("a", "anything"));
        let left = back.apply(&control(r#"{"op":"unsubscribe","devices":["a"],"prefixes":["p/"]}"#), &LIMITS).unwrap();
        assert!(!left.matches("a", "t") && !left.matches("p/1", "t") && !left.every_device, "nothing, not everything");
        let all = left.apply(&control(r#"{"op":"subscribe","prefixes":[""]}"#), &LIMITS).unwrap();
        assert!(all.matches("anything", "t"), "the prefix \"\" is every device");
        let kept = all.apply(&control(r#"{"op":"subscribe","devices":["x"]}"#), &LIMITS).unwrap();
        assert!(kept.matches("anything", "t"), "an explicit \"\" is a room like any other");
        // Unsubscribing what is not held changes nothing and is fine.
        assert_eq!(all.apply(&control(r#"{"op":"unsubscribe","devices":["zz"]}"#), &LIMITS).unwrap(), all);
        let untyped = typed.apply(&control(r#"{"op":"unsubscribe","types":["gps"]}"#), &LIMITS).unwrap();
        assert!(!untyped.matches("a", "gps") && !untyped.every_type, "no type left: nothing");
    }

    #[test]
    fn frames_are_refused_whole_past_bounds_or_scope() {
        let s = Selection::new("f/", &[], &[], &[]);
        let e = s.apply(&control(r#"{"op":"subscribe","devices":["f/1","g/1"]}"#), &LIMITS).unwrap_err();
        assert!(e.contains("devices[1]") && e.contains("device_prefix \"f/\""), "{e}");
        let e = s.apply(&control(r#"{"op":"subscribe","prefixes":[""]}"#), &LIMITS).unwrap_err();
        assert!(e.contains("prefixes[0]"), "{e}");
        let e = s.apply(&control(r#"{"op":"subscribe","prefixes":["f/1","f/2","f/3"]}"#), &LIMITS).unwrap_err();
        assert!(e.contains("websocket.max_prefixes_per_socket (2)"), "{e}");
        let e = s.apply(&control(r#"{"op":"subscribe","types":["a","b","c"]}"#), &LIMITS).unwrap_err();
        assert!(e.contains("websocket.max_types_per_socket"), "{e}");
    }

    #[test]
    fn frames_are_told_apart_from_events() {
        assert!(classify(r#"{"device_id":"d","type":"t","ts":1}"#, 512).is_none());
        assert!(classify(r#"[{"op":"subscribe"}]"#, 512).is_none(), "an array is an ingest frame");
        assert!(classify(r#"{"device_id":"d","op":"subscribe"}"#, 512).is_none(), "an event with an op field");
        assert!(classify(r#"{"device_id":"d","payload":{"op":1}}"#, 512).is_none());
        assert!(classify(r#"{"device_id":"d","op":1,"#, 512).is_none(), "broken JSON naming device_id");
        let c = control(r#" {"op":"unsubscribe","id":7,"types":["gps"]}"#);
        assert_eq!((c.op, c.id, c.types), (Op::Unsubscribe, Some(7.into()), b(&["gps"])));
        assert!(control(r#"{"op":"subscribe","snapshot":true}"#).snapshot);
    }

    #[test]
    fn bad_frames_name_the_field_to_fix() {
        for (frame, wanted) in [
            (r#"{"op":"subscribe","devices":["a"]"#, "not valid JSON"),
            (r#"{"op":"join"}"#, "op must be"),
            (r#"{"op":7}"#, "op must be"),
            (r#"{"op":"subscribe","devices":"a"}"#, "devices must be an array"),
            (r#"{"op":"subscribe","devices":["a",1]}"#, "devices[1] must be a string"),
            (r#"{"op":"subscribe","devices":[""]}"#, "devices[0] must be 1-128 bytes"),
            (r#"{"op":"subscribe","types":[""]}"#, "types[0] must be 1-64 bytes"),
            (r#"{"op":"subscribe","room":"a"}"#, "unknown field `room`"),
            (r#"{"op":"subscribe","id":[1]}"#, "id must be"),
            (r#"{"op":"unsubscribe","every_type":true}"#, "subscribe only"),
            (r#"{"op":"subscribe","every_type":true,"types":["a"]}"#, "do not go together"),
            (r#"{"op":"subscribe","snapshot":"yes"}"#, "snapshot must be true or false"),
        ] {
            let e = refusal(frame);
            assert!(e.contains(wanted), "{frame}: {e}");
        }
        let long = format!(r#"{{"op":"subscribe","devices":["{}"]}}"#, "a".repeat(600));
        assert!(classify(&long, 512).unwrap().unwrap_err().error.contains("websocket.max_control_frame_bytes (512)"));
        let err = classify(r#"{"op":"join","id":"x1"}"#, 512).unwrap().unwrap_err();
        let answer: Value = serde_json::from_str(&err.answer()).unwrap();
        assert_eq!(answer, serde_json::json!({"op": "join", "id": "x1", "ok": false, "error": err.error}));
        let c = control(r#"{"op":"subscribe","id":"q","devices":["a"]}"#);
        let ok: Value = serde_json::from_str(&c.answer(&Selection::new("", &b(&["a"]), &[], &[]))).unwrap();
        assert_eq!(
            ok,
            serde_json::json!({"op":"subscribe","id":"q","ok":true,"devices":1,"prefixes":0,"types":0,"every_type":true})
        );
    }

    #[test]
    fn the_index_finds_exactly_the_matching_members_once() {
        let mut rooms = Rooms::default();
        rooms.insert(1, 1u32, Selection::new("", &b(&["a"]), &[], &[]));
        rooms.insert(2, 2, Selection::new("", &b(&["a", "b"]), &b(&["a", "fleet/"]), &b(&["gps"])));
        rooms.insert(3, 3, Selection::new("", &[], &[], &[]));
        rooms.insert(4, 4, Selection::new("fleet/", &[], &[], &[]));
        rooms.insert(5, 5, Selection::new("", &[], &b(&["fleet/7/"]), &[]));
        assert_eq!(matches(&rooms, "a", "gps"), [1, 2, 3], "found through a device and a prefix, offered once");
        assert_eq!(matches(&rooms, "a", "boot"), [1, 3]);
        assert_eq!(matches(&rooms, "fleet/7/x", "gps"), [2, 3, 4, 5]);
        assert_eq!(matches(&rooms, "fleet", "gps"), [3]);
        assert_eq!(matches(&rooms, "é", "gps"), [3], "a prefix length inside a character is skipped");
        assert_eq!(rooms.shape(), (2, 4, 4), "\"fleet/\" is one room for two holders");
        // Replacing touches only what changed.
        let s = rooms.selection(2).unwrap().clone();
        let next = s.apply(&control(r#"{"op":"unsubscribe","devices":["a"],"prefixes":["a","fleet/"]}"#), &LIMITS);
        rooms.replace(2, next.unwrap());
        assert_eq!(matches(&rooms, "a", "gps"), [1, 3]);
        assert_eq!(matches(&rooms, "b", "gps"), [2, 3]);
        assert_eq!(rooms.shape(), (2, 3, 3), "rooms nobody holds are gone");
        assert!(rooms.remove(2) && !rooms.remove(2));
        for id in [1, 3, 4, 5] {
            rooms.remove(id);
        }
        assert_eq!((rooms.len(), rooms.shape()), (0, (0, 0, 0)), "an empty shard holds nothing");
    }

    #[test]
    fn the_index_agrees_with_the_rule_on_random_rooms() {
        // A small deterministic generator: devices d0..d29 under f0/..f2/.
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = |n: u64| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x % n
        };
        let device = |i: u64| format!("f{}/d{}", i % 3, i);
        let mut rooms = Rooms::default();
        let mut selections = Vec::new();
        for id in 0..200u64 {
            let devices: Vec<Box<str>> = (0..next(3)).map(|_| device(next(30)).into()).collect();
            let prefixes: Vec<Box<str>> = (0..next(2)).map(|_| format!("f{}/", next(4)).into()).collect();
            let types: Vec<Box<str>> = (0..next(2)).map(|_| format!("t{}", next(3)).into()).collect();
            let s = Selection::new("", &devices, &prefixes, &types);
            rooms.insert(id, id, s.clone());
            selections.push(s);
        }
        for i in 0..30 {
            for t in ["t0", "t1", "t2"] {
                let d = device(i);
                let want: Vec<u64> = (0..200).filter(|&id| selections[id as usize].matches(&d, t)).collect();
                let mut got = Vec::new();
                rooms.for_each_match(&d, t, |v| got.push(*v));
                got.sort_unstable();
                assert_eq!(got, want, "{d} {t}");
            }
        }
    }
}
