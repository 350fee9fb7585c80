//! Closed sets that several stages share and that metrics count by: the
//! routes, the kinds of rejected event, the reasons a request was shed.
//!
//! They sit below every stage so that the HTTP parser, the ingest stage, the
//! writers and `metrics` all import down to one definition (the routes used
//! to be two enums, `http::Target` and `metrics::Route`, with a mapping
//! between them). Every label value is fixed here: never anything taken
//! from a request.

/// The routes of the contract; also the label set of
/// `ingestd_http_requests_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    Events,
    Batch,
    Ws,
    Health,
    Stats,
    Metrics,
    /// `GET /devices/{device_id}`: one device's latest state.
    Device,
    /// `GET /devices?…`: a page of devices' latest state.
    Devices,
    /// Any other path.
    Unknown,
}

impl Route {
    pub const ALL: [Route; 9] = [
        Route::Events,
        Route::Batch,
        Route::Ws,
        Route::Health,
        Route::Stats,
        Route::Metrics,
        Route::Device,
        Route::Devices,
        Route::Unknown,
    ];

    /// The route of a request target (its query ignored).
    pub fn from_path(path: &str) -> Route {
        let path = path.split_once('?').map_or(path, |(p, _)| p);
        match path {
            "/events" => Route::Events,
            "/events/batch" => Route::Batch,
            "/ws" => Route::Ws,
            "/health" => Route::Health,
            "/stats" => Route::Stats,
            "/metrics" => Route::Metrics,
            "/devices" => Route::Devices,
            _ if path.starts_with("/devices/") => Route::Device,
            _ => Route::Unknown,
        }
    }

    /// The methods this route answers, for 405's `Allow`.
    pub fn allow(self) -> &'static str {
        match self {
            Route::Events | Route::Batch => "POST",
            _ => "GET, HEAD",
        }
    }

    /// Whether it takes events.
    pub fn is_ingest(self) -> bool {
        matches!(self, Route::Events | Route::Batch)
    }

    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            Route::Events => "/events",
            Route::Batch => "/events/batch",
            Route::Ws => "/ws",
            Route::Health => "/health",
            Route::Stats => "/stats",
            Route::Metrics => "/metrics",
            Route::Device => "/devices/{device_id}",
            Route::Devices => "/devices",
            Route::Unknown => "other",
        }
    }
}

/// The kinds of rejection, the label set of `ingestd_events_rejected_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RejectKind {
    Malformed,
    NotAnObject,
    MissingField,
    WrongType,
    InvalidValue,
    NulCharacter,
    TsOutOfRange,
    UnknownField,
    DuplicateField,
    PayloadTooLarge,
    PayloadTooDeep,
    /// Passed validation but PostgreSQL refused it (dead-lettered).
    RefusedByDatabase,
}

impl RejectKind {
    pub const ALL: [RejectKind; 12] = [
        RejectKind::Malformed,
        RejectKind::NotAnObject,
        RejectKind::MissingField,
        RejectKind::WrongType,
        RejectKind::InvalidValue,
        RejectKind::NulCharacter,
        RejectKind::TsOutOfRange,
        RejectKind::UnknownField,
        RejectKind::DuplicateField,
        RejectKind::PayloadTooLarge,
        RejectKind::PayloadTooDeep,
        RejectKind::RefusedByDatabase,
    ];

    pub fn label(self) -> &'static str {
        match self {
            RejectKind::Malformed => "malformed",
            RejectKind::NotAnObject => "not_an_object",
            RejectKind::MissingField => "missing_field",
            RejectKind::WrongType => "wrong_type",
            RejectKind::InvalidValue => "invalid_value",
            RejectKind::NulCharacter => "nul_character",
            RejectKind::TsOutOfRange => "ts_out_of_range",
            RejectKind::UnknownField => "unknown_field",
            RejectKind::DuplicateField => "duplicate_field",
            RejectKind::PayloadTooLarge => "payload_too_large",
            RejectKind::PayloadTooDeep => "payload_too_deep",
            RejectKind::RefusedByDatabase => "refused_by_database",
        }
    }
}

/// Why a request was answered 503 without being stored: the label set of
/// `ingestd_requests_shed_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shed {
    /// The writers' ring was full.
    RingFull,
    /// The database circuit breaker was open.
    BreakerOpen,
    /// The request did not fit in `limits.memory_budget_bytes`.
    MemoryBudget,
    /// Admission estimated a wait past `ingest.max_wait_ms`.
    WaitEstimate,
    /// It waited past `ingest.max_wait_ms` without a writer starting its COPY.
    WaitExpired,
    /// The disk spool could not take it (full, busy, failed, or slower than
    /// `ingest.max_wait_ms`).
    Spool,
    /// Shutting down.
    ShuttingDown,
    /// A device read found the readers' queue full (`[state] readers`).
    ReadersBusy,
    /// A device read was not answered within `state.read_timeout_ms`.
    ReadTimeout,
}

impl Shed {
    pub const ALL: [Shed; 9] = [
        Shed::RingFull,
        Shed::BreakerOpen,
        Shed::MemoryBudget,
        Shed::WaitEstimate,
        Shed::WaitExpired,
        Shed::Spool,
        Shed::ShuttingDown,
        Shed::ReadersBusy,
        Shed::ReadTimeout,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Shed::RingFull => "ring_full",
            Shed::BreakerOpen => "breaker_open",
            Shed::MemoryBudget => "memory_budget",
            Shed::WaitEstimate => "wait_estimate",
            Shed::WaitExpired => "wait_expired",
            Shed::Spool => "spool",
            Shed::ShuttingDown => "shutting_down",
            Shed::ReadersBusy => "readers_busy",
            Shed::ReadTimeout => "read_timeout",
        }
    }
}
