//! Snapshots: the current state of a subscriber's rooms, sent before their
//! live events, with nothing missing and nothing twice in between.
//!
//! A dashboard that opens a socket (or joins a room) wants to see every
//! device at once, not each one when it next reports. With `[state]` on,
//! `snapshot=true` in the URL or `"snapshot": true` in a subscribe frame
//! sends, for each device of the rooms, its state object (the
//! `GET /devices` object marked `"snapshot": true`), then a done marker
//! `{"op":"snapshot","id":…,"done":true,"devices":N,"complete":bool}`, then
//! the live feed.
//!
//! # The hand-over
//!
//! 1. The new rooms are in the shard's index *before* the state is read, so
//!    every event committed from then on is queued for the subscriber; the
//!    queue is *held* (not sent) until the snapshot is out. The held events
//!    count against the subscriber's queue bounds and the overflow policy
//!    applies to them as to a slow subscriber.
//! 2. The state is read in pages (`state.max_page`) through the readers
//!    (`devices::read`, a connection of their own, `state.read_timeout_ms`
//!    per page), and each object is sent as it comes; [`Seen`] keeps, per
//!    device sent, the `event_id` its state was made of.
//! 3. Released: a held event of a device the snapshot sent is dropped when
//!    it is that device's state event or came before it in the queue (the
//!    snapshot already shows it, or something newer). What comes after it,
//!    and every event of a device the snapshot did not send, is delivered.
//! 4. An event committed before the read but published to this shard after
//!    the release (a writer publishes right after its COMMIT returns, so
//!    this is a window of milliseconds) is recognised by its `event_id` for
//!    [`SETTLE`] more and dropped.
//!
//! So per device the client sees the state, then only events committed
//! after it, in commit order. A snapshot that fails (database down, readers
//! busy, too slow) ends with `{"op":"snapshot",…,"ok":false,"error":…}`;
//! the rooms stay joined and the live feed goes on.
//!
//! Pure: the session in `ws` drives it.

use std::borrow::Cow;
use std::collections::HashMap;
use std::time::{Duration, Instant};

use serde::Deserialize;
use serde_json::{Map, Value};

use super::rooms::{Control, Selection};
use crate::read::DeviceFilter;

/// How long after a snapshot a live event with a sent state's `event_id`
/// is still recognised (step 4 of the hand-over).
pub const SETTLE: Duration = Duration::from_secs(5);

/// What a snapshot reads: the devices and prefixes a subscribe frame named
/// (all the socket's rooms when it named none, and always for the URL),
/// with the socket's type filter. `None`: the rooms hold no device.
pub fn filter(now: &Selection, frame: Option<&Control>) -> Option<DeviceFilter> {
    let named = frame.filter(|c| !c.devices.is_empty() || !c.prefixes.is_empty());
    let (devices, prefixes): (Vec<String>, Vec<String>) = match named {
        Some(c) => {
            (c.devices.iter().map(|d| d.to_string()).collect(), c.prefixes.iter().map(|p| p.to_string()).collect())
        }
        None => {
            (now.devices.iter().map(|d| d.to_string()).collect(), now.prefixes.iter().map(|p| p.to_string()).collect())
        }
    };
    if devices.is_empty() && prefixes.is_empty() {
        return None;
    }
    let types = if now.every_type { Vec::new() } else { now.types.iter().map(|t| t.to_string()).collect() };
    if !now.every_type && types.is_empty() {
        // Subscribed to no type: nothing would match.
        return None;
    }
    Some(DeviceFilter { devices, prefixes, types, ..DeviceFilter::default() })
}

/// One device's state object (`GET /devices`' object) as a frame, marked.
pub fn frame(object: &str) -> String {
    let rest = object.strip_prefix('{').unwrap_or(object);
    let mut s = String::with_capacity(object.len() + 17);
    s.push_str("{\"snapshot\":true");
    if rest != "}" {
        s.push(',');
    }
    s.push_str(rest);
    s
}

/// The done marker: `devices` sent, `complete` unless
/// `websocket.snapshot_max_devices` cut it short.
pub fn done(id: Option<&Value>, devices: usize, complete: bool) -> String {
    let mut a = marker(id);
    a.insert("done".into(), true.into());
    a.insert("devices".into(), devices.into());
    a.insert("complete".into(), complete.into());
    Value::Object(a).to_string()
}

/// A snapshot that ended early: why, and how many devices were sent.
pub fn failed(id: Option<&Value>, devices: usize, error: &str) -> String {
    let mut a = marker(id);
    a.insert("ok".into(), false.into());
    a.insert("devices".into(), devices.into());
    a.insert("error".into(), error.into());
    Value::Object(a).to_string()
}

fn marker(id: Option<&Value>) -> Map<String, Value> {
    let mut a = Map::new();
    a.insert("op".into(), "snapshot".into());
    if let Some(id) = id {
        a.insert("id".into(), id.clone());
    }
    a
}

/// The ids of an event in the feed's JSON.
#[derive(Deserialize)]
struct Ids<'a> {
    #[serde(borrow)]
    event_id: Cow<'a, str>,
    #[serde(borrow)]
    device_id: Cow<'a, str>,
}

/// `(device_id, event_id)` of a feed event's JSON.
fn ids(json: &[u8]) -> Option<(Cow<'_, str>, Cow<'_, str>)> {
    let ids: Ids<'_> = serde_json::from_slice(json).ok()?;
    Some((ids.device_id, ids.event_id))
}

/// The state event the snapshot sent for each device: `device_id` →
/// `event_id`. Bounded by `websocket.snapshot_max_devices`.
#[derive(Debug, Default)]
pub struct Seen {
    sent: HashMap<Box<str>, Box<str>>,
}

impl Seen {
    pub fn insert(&mut self, device_id: &str, event_id: &str) {
        self.sent.insert(device_id.into(), event_id.into());
    }

    pub fn len(&self) -> usize {
        self.sent.len()
    }

    pub fn is_empty(&self) -> bool {
        self.sent.is_empty()
    }

    /// Bytes it holds (for the memory budget).
    pub fn memory_bytes(&self) -> usize {
        self.sent.iter().map(|(d, e)| d.len() + e.len() + 64).sum()
    }

    /// Which of the held events (their JSON, in queue order) to drop (step
    /// 3): per device sent, those up to and including its state event.
    /// The devices whose state event was found are forgotten.
    pub fn release<'a>(&mut self, held: impl Iterator<Item = &'a [u8]>) -> Vec<bool> {
        // Each held event's ids, parsed once.
        let ids: Vec<_> = held.map(ids).collect();
        // The last position of each sent state event among the held ones.
        let mut upto: HashMap<&str, usize> = HashMap::new();
        for (i, (device, event)) in ids.iter().enumerate().filter_map(|(i, e)| Some((i, e.as_ref()?))) {
            if self.sent.get(&**device).is_some_and(|sent| **sent == **event) {
                upto.insert(device, i);
            }
        }
        let drop = ids
            .iter()
            .enumerate()
            .map(|(i, e)| e.as_ref().and_then(|(device, _)| upto.get(&**device)).is_some_and(|&last| i <= last))
            .collect();
        for device in upto.keys() {
            self.sent.remove(*device);
        }
        drop
    }

    /// Whether a live event after the release is a state event the
    /// snapshot already sent (step 4); forgets it when it is.
    pub fn recognises(&mut self, device_id: &str, json: &[u8]) -> bool {
        let Some(sent) = self.sent.get(device_id) else { return false };
        let same = ids(json).is_some_and(|(_, event)| **sent == *event);
        if same {
            self.sent.remove(device_id);
        }
        same
    }
}

/// [`Seen`] after the release, until [`SETTLE`] has passed.
#[derive(Debug)]
pub struct Settling {
    pub until: Instant,
    pub seen: Seen,
}

impl Settling {
    pub fn new(seen: Seen, now: Instant) -> Settling {
        Settling { until: now + SETTLE, seen }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(device: &str, id: &str) -> Vec<u8> {
        format!(r#"{{"event_id":"{id}","device_id":"{device}","type":"t","ts":"2026-01-01T00:00:00Z"}}"#).into_bytes()
    }

    #[test]
    fn a_state_object_becomes_a_marked_frame() {
        assert_eq!(frame(r#"{"event_id":"e","events":1}"#), r#"{"snapshot":true,"event_id":"e","events":1}"#);
        let v: Value = serde_json::from_str(&frame(r#"{"a":1}"#)).unwrap();
        assert_eq!(v["snapshot"], true);
        assert_eq!(
            done(Some(&Value::from(7)), 3, true),
            r#"{"complete":true,"devices":3,"done":true,"id":7,"op":"snapshot"}"#
        );
        assert!(failed(None, 0, "database down").contains(r#""ok":false"#));
    }

    #[test]
    fn held_events_up_to_the_sent_state_are_dropped_and_the_rest_kept() {
        let mut seen = Seen::default();
        seen.insert("a", "a2");
        seen.insert("b", "b9"); // b9 is not among the held events
        let held = [ev("a", "a1"), ev("b", "b1"), ev("a", "a2"), ev("c", "c1"), ev("a", "a3")];
        let drop = seen.release(held.iter().map(Vec::as_slice));
        assert_eq!(drop, [true, false, true, false, false]);
        // a's state event was found; b's is still awaited.
        assert!(!seen.recognises("a", &ev("a", "a2")));
        assert!(!seen.recognises("b", &ev("b", "b2")));
        assert!(seen.recognises("b", &ev("b", "b9")));
        assert!(!seen.recognises("b", &ev("b", "b9")), "recognised once");
    }

    #[test]
    fn the_filter_is_what_the_frame_named_or_every_room() {
        let every = Selection::new("", &[], &[], &[]);
        let f = filter(&every, None).unwrap();
        assert_eq!((f.devices.len(), f.prefixes, f.types.len()), (0, vec![String::new()], 0));
        let scoped = Selection::new("fleet-7/", &["fleet-7/1".into()], &[], &["gps".into()]);
        let f = filter(&scoped, None).unwrap();
        assert_eq!((f.devices, f.prefixes, f.types), (vec!["fleet-7/1".to_string()], vec![], vec!["gps".to_string()]));
        let none = Selection::new("", &["x".into()], &[], &[]);
        let mut emptied = none.clone();
        emptied.devices.clear();
        emptied.prefixes.clear();
        assert!(filter(&emptied, None).is_none());
    }
}
