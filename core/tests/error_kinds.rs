//! `Error::kind`: one distinct `snake_case` name per variant, at its
//! `kind_index` in `Error::KINDS`, so that per-kind counter tables indexed
//! by it count every kind apart.

use kvxfer_core::error::{bounded, DescError, MetaError};
use kvxfer_core::{Error, MemKind, Side, XferHandle};

/// One error of every variant, with the kind it must report.
fn one_of_each() -> Vec<(Error, &'static str)> {
    let h = XferHandle {
        index: 1,
        generation: 2,
    };
    vec![
        (
            Error::InvalidDesc {
                side: Side::Local,
                index: 0,
                addr: 1,
                len: 0,
                reason: DescError::ZeroLength,
            },
            "invalid_desc",
        ),
        (Error::NotRegistered { addr: 1, len: 2 }, "not_registered"),
        (
            Error::OverlappingRegistration {
                addr: 1,
                len: 2,
                existing_addr: 1,
                existing_len: 2,
            },
            "overlapping_registration",
        ),
        (Error::InvalidRegion { addr: 1, len: 0 }, "invalid_region"),
        (Error::RegionBusy { addr: 1, users: 2 }, "region_busy"),
        (Error::unknown_peer("p"), "unknown_peer"),
        (
            Error::CountMismatch {
                local: 1,
                remote: 2,
            },
            "count_mismatch",
        ),
        (
            Error::LengthMismatch {
                index: 0,
                local: 1,
                remote: 2,
            },
            "length_mismatch",
        ),
        (Error::StaleHandle { handle: h }, "stale_handle"),
        (Error::InProgress { handle: h }, "in_progress"),
        (
            Error::capacity("transfers", 4, "xfers"),
            "capacity_exceeded",
        ),
        (
            Error::InvalidCapacity {
                setting: "xfers",
                value: 1,
                max: 0,
            },
            "invalid_capacity",
        ),
        (Error::RegionInUse { addr: 1 }, "region_in_use"),
        (
            Error::UnsupportedMemKind {
                backend: "UCX",
                kind: MemKind::Vram,
            },
            "unsupported_mem_kind",
        ),
        (
            Error::Unsupported {
                backend: "UCX",
                what: "cancel",
            },
            "unsupported",
        ),
        (Error::backend("UCX", -1, "x"), "backend"),
        (Error::disconnected("p"), "remote_disconnected"),
        (Error::Cancelled, "cancelled"),
        (Error::TimedOut { after_ms: 5 }, "timed_out"),
        (Error::BadMetadata(MetaError::BadMagic), "bad_metadata"),
        (
            Error::BufferTooSmall {
                needed: 2,
                available: 1,
            },
            "buffer_too_small",
        ),
        (
            Error::NotificationTooLong { len: 2, max: 1 },
            "notification_too_long",
        ),
        (Error::InvalidName { len: 0 }, "invalid_name"),
        (Error::ShutDown, "shut_down"),
        (
            Error::UnsupportedBackend {
                value: bounded("FOO"),
                supported: "UCX",
            },
            "unsupported_backend",
        ),
        (Error::StalePeer { peer: bounded("p") }, "stale_peer"),
        (
            Error::StalePrepared {
                index: 1,
                generation: 2,
            },
            "stale_prepared",
        ),
        (
            Error::IndexOutOfRange {
                side: Side::Remote,
                index: 0,
                value: 9,
                len: 1,
            },
            "index_out_of_range",
        ),
        (
            Error::MalformedNotification { len: 1 },
            "malformed_notification",
        ),
        (
            Error::NotificationDropped { len: 0, count: 1 },
            "notification_dropped",
        ),
        (
            Error::NotificationsLost {
                peer: bounded("p"),
                count: 1,
            },
            "notifications_lost",
        ),
        (
            Error::NotificationsRefused {
                peer: bounded("p"),
                count: 1,
            },
            "notifications_refused",
        ),
        (Error::rails_failed("p", "eth1: down"), "rails_failed"),
    ]
}

#[test]
fn every_variant_has_its_own_kind_at_its_index() {
    let all = one_of_each();
    assert_eq!(all.len(), Error::KINDS.len(), "one error per kind");
    for (i, (e, kind)) in all.iter().enumerate() {
        assert_eq!(e.kind(), *kind, "{e:?}");
        assert_eq!(e.kind_index(), i, "{e:?}");
        assert_eq!(Error::KINDS[e.kind_index()], *kind);
    }
}

#[test]
fn kinds_are_distinct_snake_case_labels() {
    for (i, k) in Error::KINDS.iter().enumerate() {
        assert!(!k.is_empty());
        assert!(
            k.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'),
            "{k:?} is not snake_case"
        );
        assert!(!Error::KINDS[..i].contains(k), "{k:?} twice");
    }
}
