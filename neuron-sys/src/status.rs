//! Names of the runtime's status codes (`NRT_STATUS`), for messages and metrics.

use crate::bindings::*;

/// Every documented `NRT_STATUS` value with its name, in numeric order.
pub const STATUS_NAMES: [(NRT_STATUS, &str); 28] = [
    (NRT_SUCCESS, "NRT_SUCCESS"),
    (NRT_FAILURE, "NRT_FAILURE"),
    (NRT_INVALID, "NRT_INVALID"),
    (NRT_INVALID_HANDLE, "NRT_INVALID_HANDLE"),
    (NRT_RESOURCE, "NRT_RESOURCE"),
    (NRT_TIMEOUT, "NRT_TIMEOUT"),
    (NRT_HW_ERROR, "NRT_HW_ERROR"),
    (NRT_QUEUE_FULL, "NRT_QUEUE_FULL"),
    (NRT_LOAD_NOT_ENOUGH_NC, "NRT_LOAD_NOT_ENOUGH_NC"),
    (NRT_UNSUPPORTED_NEFF_VERSION, "NRT_UNSUPPORTED_NEFF_VERSION"),
    (NRT_FAIL_HOST_MEM_ALLOC, "NRT_FAIL_HOST_MEM_ALLOC"),
    (NRT_UNINITIALIZED, "NRT_UNINITIALIZED"),
    (NRT_CLOSED, "NRT_CLOSED"),
    (NRT_QUEUE_EMPTY, "NRT_QUEUE_EMPTY"),
    (NRT_EXEC_UNIT_UNRECOVERABLE, "NRT_EXEC_UNIT_UNRECOVERABLE"),
    (NRT_EXEC_BAD_INPUT, "NRT_EXEC_BAD_INPUT"),
    (NRT_EXEC_COMPLETED_WITH_NUM_ERR, "NRT_EXEC_COMPLETED_WITH_NUM_ERR"),
    (NRT_EXEC_COMPLETED_WITH_ERR, "NRT_EXEC_COMPLETED_WITH_ERR"),
    (NRT_EXEC_NC_BUSY, "NRT_EXEC_NC_BUSY"),
    (NRT_EXEC_OOB, "NRT_EXEC_OOB"),
    (NRT_COLL_PENDING, "NRT_COLL_PENDING"),
    (NRT_EXEC_HW_ERR_COLLECTIVES, "NRT_EXEC_HW_ERR_COLLECTIVES"),
    (NRT_EXEC_HW_ERR_HBM_UE, "NRT_EXEC_HW_ERR_HBM_UE"),
    (NRT_EXEC_HW_ERR_NC_UE, "NRT_EXEC_HW_ERR_NC_UE"),
    (NRT_EXEC_HW_ERR_DMA_ABORT, "NRT_EXEC_HW_ERR_DMA_ABORT"),
    (NRT_EXEC_SW_NQ_OVERFLOW, "NRT_EXEC_SW_NQ_OVERFLOW"),
    (NRT_EXEC_HW_ERR_REPAIRABLE_HBM_UE, "NRT_EXEC_HW_ERR_REPAIRABLE_HBM_UE"),
    (NRT_NETWORK_PROXY_FAILURE, "NRT_NETWORK_PROXY_FAILURE"),
];

/// The documented name of a status code (`5` → `"NRT_TIMEOUT"`); `None` for codes this header does
/// not know (newer runtimes may return more), which callers keep as raw integers.
pub fn status_name(code: u32) -> Option<&'static str> {
    STATUS_NAMES.iter().find(|(c, _)| *c == code).map(|(_, name)| *name)
}

/// A printable label: the name when known, `NRT status <code>` otherwise.
pub fn status_label(code: u32) -> String {
    match status_name(code) {
        Some(name) => name.to_owned(),
        None => format!("NRT status {code}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_every_documented_status() {
        let expected = [
            (0, "NRT_SUCCESS"),
            (1, "NRT_FAILURE"),
            (2, "NRT_INVALID"),
            (3, "NRT_INVALID_HANDLE"),
            (4, "NRT_RESOURCE"),
            (5, "NRT_TIMEOUT"),
            (6, "NRT_HW_ERROR"),
            (7, "NRT_QUEUE_FULL"),
            (9, "NRT_LOAD_NOT_ENOUGH_NC"),
            (10, "NRT_UNSUPPORTED_NEFF_VERSION"),
            (11, "NRT_FAIL_HOST_MEM_ALLOC"),
            (13, "NRT_UNINITIALIZED"),
            (14, "NRT_CLOSED"),
            (15, "NRT_QUEUE_EMPTY"),
            (101, "NRT_EXEC_UNIT_UNRECOVERABLE"),
            (1002, "NRT_EXEC_BAD_INPUT"),
            (1003, "NRT_EXEC_COMPLETED_WITH_NUM_ERR"),
            (1004, "NRT_EXEC_COMPLETED_WITH_ERR"),
            (1005, "NRT_EXEC_NC_BUSY"),
            (1006, "NRT_EXEC_OOB"),
            (1100, "NRT_COLL_PENDING"),
            (1200, "NRT_EXEC_HW_ERR_COLLECTIVES"),
            (1201, "NRT_EXEC_HW_ERR_HBM_UE"),
            (1202, "NRT_EXEC_HW_ERR_NC_UE"),
            (1203, "NRT_EXEC_HW_ERR_DMA_ABORT"),
            (1204, "NRT_EXEC_SW_NQ_OVERFLOW"),
            (1205, "NRT_EXEC_HW_ERR_REPAIRABLE_HBM_UE"),
            (1206, "NRT_NETWORK_PROXY_FAILURE"),
        ];
        for (code, name) in expected {
            assert_eq!(status_name(code), Some(name), "code {code}");
        }
        assert_eq!(STATUS_NAMES.len(), expected.len());
    }

    #[test]
    fn unknown_codes_stay_raw_integers() {
        assert_eq!(status_name(8), None);
        assert_eq!(status_name(12), None);
        assert_eq!(status_name(4242), None);
        assert_eq!(status_label(4242), "NRT status 4242");
        assert_eq!(status_label(1201), "NRT_EXEC_HW_ERR_HBM_UE");
    }
}
