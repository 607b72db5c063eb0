//! The datasets' schemas and their column names, in one place: the encoder,
//! the jobs that read the datasets back and the docs name columns from here.
//!
//! Pure: schema definitions only.

use std::sync::{Arc, LazyLock};

use arrow_schema::{DataType, Field, Schema, SchemaRef, TimeUnit};

/// Column names, as readers of the datasets (and the jobs here) find them.
pub mod col {
    /// `fleet`.
    pub const FLEET: &str = "fleet";
    /// `device_id`.
    pub const DEVICE_ID: &str = "device_id";
    /// `epoch`.
    pub const EPOCH: &str = "epoch";
    /// `seq`.
    pub const SEQ: &str = "seq";
    /// `ts`.
    pub const TS: &str = "ts";
    /// `signal`.
    pub const SIGNAL: &str = "signal";
    /// `value`.
    pub const VALUE: &str = "value";
    /// `gateway_id`.
    pub const GATEWAY_ID: &str = "gateway_id";
    /// `received_at`.
    pub const RECEIVED_AT: &str = "received_at";
    /// `stored_at`.
    pub const STORED_AT: &str = "stored_at";
    /// `reason`.
    pub const REASON: &str = "reason";
    /// `detail`.
    pub const DETAIL: &str = "detail";
    /// `kind`.
    pub const KIND: &str = "kind";
    /// `bundle_id`.
    pub const BUNDLE_ID: &str = "bundle_id";
    /// `raw`.
    pub const RAW: &str = "raw";
    /// `schema_id`.
    pub const SCHEMA_ID: &str = "schema_id";
    /// `window`.
    pub const WINDOW: &str = "window";
    /// `window_start`.
    pub const WINDOW_START: &str = "window_start";
    /// `window_end`.
    pub const WINDOW_END: &str = "window_end";
    /// `samples`.
    pub const SAMPLES: &str = "samples";
    /// `distance_m`.
    pub const DISTANCE_M: &str = "distance_m";
    /// `speed_readings`.
    pub const SPEED_READINGS: &str = "speed_readings";
    /// `avg_speed_kmh`.
    pub const AVG_SPEED_KMH: &str = "avg_speed_kmh";
    /// `max_speed_kmh`.
    pub const MAX_SPEED_KMH: &str = "max_speed_kmh";
    /// `fuel_used_l`.
    pub const FUEL_USED_L: &str = "fuel_used_l";
    /// `tire_readings`.
    pub const TIRE_READINGS: &str = "tire_readings";
    /// `tire_pressure_min_kpa`.
    pub const TIRE_PRESSURE_MIN_KPA: &str = "tire_pressure_min_kpa";
    /// `tire_pressure_mean_kpa`.
    pub const TIRE_PRESSURE_MEAN_KPA: &str = "tire_pressure_mean_kpa";
    /// `tire_pressure_max_kpa`.
    pub const TIRE_PRESSURE_MAX_KPA: &str = "tire_pressure_max_kpa";
    /// `leak_rate_kpa_h`.
    pub const LEAK_RATE_KPA_H: &str = "leak_rate_kpa_h";
    /// `id`.
    pub const ID: &str = "id";
    /// `detected_ts`.
    pub const DETECTED_TS: &str = "detected_ts";
    /// `wheel`.
    pub const WHEEL: &str = "wheel";
    /// `model`.
    pub const MODEL: &str = "model";
    /// `version`.
    pub const VERSION: &str = "version";
    /// `variant`.
    pub const VARIANT: &str = "variant";
    /// `score`.
    pub const SCORE: &str = "score";
    /// `feature_hash`.
    pub const FEATURE_HASH: &str = "feature_hash";
}

/// Timestamps: milliseconds, UTC.
pub fn ts_type() -> DataType {
    DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into()))
}

/// Schema of `readings`: one row per sample, long format.
pub static READINGS_SCHEMA: LazyLock<SchemaRef> = LazyLock::new(|| {
    Arc::new(Schema::new(vec![
        Field::new(col::FLEET, DataType::Utf8, false),
        Field::new(col::DEVICE_ID, DataType::Utf8, false),
        Field::new(col::EPOCH, DataType::Int64, false),
        Field::new(col::SEQ, DataType::Int64, false),
        Field::new(col::TS, ts_type(), false),
        Field::new(col::SIGNAL, DataType::Utf8, false),
        Field::new(col::VALUE, DataType::Float64, false),
        Field::new(col::GATEWAY_ID, DataType::Utf8, false),
        Field::new(col::RECEIVED_AT, ts_type(), false),
        Field::new(col::STORED_AT, ts_type(), false),
    ]))
});

/// Schema of `deadletter`: what could not be used, with why and its raw bytes.
pub static DEADLETTER_SCHEMA: LazyLock<SchemaRef> = LazyLock::new(|| {
    Arc::new(Schema::new(vec![
        Field::new(col::REASON, DataType::Utf8, false),
        Field::new(col::DETAIL, DataType::Utf8, false),
        Field::new(col::FLEET, DataType::Utf8, true),
        Field::new(col::DEVICE_ID, DataType::Utf8, true),
        Field::new(col::EPOCH, DataType::Int64, true),
        Field::new(col::SEQ, DataType::Int64, true),
        Field::new(col::TS, ts_type(), true),
        Field::new(col::KIND, DataType::Int32, true),
        Field::new(col::GATEWAY_ID, DataType::Utf8, true),
        Field::new(col::BUNDLE_ID, DataType::Int64, true),
        Field::new(col::RECEIVED_AT, ts_type(), true),
        Field::new(col::STORED_AT, ts_type(), false),
        Field::new(col::RAW, DataType::Binary, false),
        Field::new(col::SCHEMA_ID, DataType::Int32, true),
    ]))
});

/// Schema of `aggregates`: one row per vehicle per closed window.
pub static AGGREGATES_SCHEMA: LazyLock<SchemaRef> = LazyLock::new(|| {
    let f = |name: &str| Field::new(name, DataType::Float64, true);
    Arc::new(Schema::new(vec![
        Field::new(col::FLEET, DataType::Utf8, false),
        Field::new(col::DEVICE_ID, DataType::Utf8, false),
        Field::new(col::WINDOW, DataType::Utf8, false),
        Field::new(col::WINDOW_START, ts_type(), false),
        Field::new(col::WINDOW_END, ts_type(), false),
        Field::new(col::SAMPLES, DataType::Int64, false),
        Field::new(col::DISTANCE_M, DataType::Float64, false),
        Field::new(col::SPEED_READINGS, DataType::Int64, false),
        f(col::AVG_SPEED_KMH),
        f(col::MAX_SPEED_KMH),
        f(col::FUEL_USED_L),
        f("fuel_l_per_100km"),
        Field::new(col::TIRE_READINGS, DataType::Int64, false),
        f(col::TIRE_PRESSURE_MIN_KPA),
        f(col::TIRE_PRESSURE_MEAN_KPA),
        f(col::TIRE_PRESSURE_MAX_KPA),
        f(col::LEAK_RATE_KPA_H),
        Field::new(col::STORED_AT, ts_type(), false),
    ]))
});

/// Schema of `events`: one row per detected condition.
pub static EVENTS_SCHEMA: LazyLock<SchemaRef> = LazyLock::new(|| {
    Arc::new(Schema::new(vec![
        Field::new(col::ID, DataType::Utf8, false),
        Field::new(col::FLEET, DataType::Utf8, false),
        Field::new(col::DEVICE_ID, DataType::Utf8, false),
        Field::new(col::KIND, DataType::Utf8, false),
        Field::new(col::TS, ts_type(), false),
        Field::new(col::DETECTED_TS, ts_type(), false),
        Field::new(col::WHEEL, DataType::Utf8, true),
        Field::new(col::VALUE, DataType::Float64, true),
        Field::new(col::DETAIL, DataType::Utf8, false),
        Field::new(col::STORED_AT, ts_type(), false),
    ]))
});

/// Schema of `predictions`: one row per vehicle, closed window, model and
/// variant (the shadow's included).
pub static PREDICTIONS_SCHEMA: LazyLock<SchemaRef> = LazyLock::new(|| {
    Arc::new(Schema::new(vec![
        Field::new(col::FLEET, DataType::Utf8, false),
        Field::new(col::DEVICE_ID, DataType::Utf8, false),
        Field::new(col::WINDOW_START, ts_type(), false),
        Field::new(col::WINDOW_END, ts_type(), false),
        Field::new(col::MODEL, DataType::Utf8, false),
        Field::new(col::VERSION, DataType::Int64, false),
        Field::new(col::VARIANT, DataType::Utf8, false),
        Field::new(col::SCORE, DataType::Float64, false),
        Field::new(col::FEATURE_HASH, DataType::Utf8, false),
        Field::new(col::STORED_AT, ts_type(), false),
    ]))
});
