//! The fixed 1024-byte little-endian header at the start of every NEFF file.

/// Length of the NEFF header in bytes (the payload starts after `header_size`, normally this).
pub const HEADER_LEN: usize = 1024;

// Field offsets, as packed in real files (no alignment padding between fields).
const OFF_PKG_VERSION: usize = 0;
const OFF_HEADER_SIZE: usize = 8;
const OFF_DATA_SIZE: usize = 16;
const OFF_VERSION_MAJOR: usize = 24;
const OFF_VERSION_MINOR: usize = 32;
const OFF_BUILD_VERSION: usize = 40;
const LEN_BUILD_VERSION: usize = 128;
const OFF_NUM_TPB: usize = 168;
const OFF_HASH: usize = 172;
const LEN_HASH: usize = 32;
const OFF_UUID: usize = 204;
const LEN_UUID: usize = 16;
const OFF_NAME: usize = 220;
const LEN_NAME: usize = 256;
const OFF_REQUESTED_TPB_COUNT: usize = 476;
const OFF_FEATURE_BITS: usize = 544;
const OFF_LNC_SIZE: usize = 552;

/// The decoded header fields of a NEFF file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NeffHeader {
    /// Container version; 2 means a gzip'd tar payload.
    pub pkg_version: u64,
    /// Bytes before the payload (1024 in every known file).
    pub header_size: u64,
    /// Length of the payload in bytes.
    pub data_size: u64,
    /// NEFF format major version.
    pub neff_version_major: u64,
    /// NEFF format minor version.
    pub neff_version_minor: u64,
    /// Compiler build version string (often empty).
    pub build_version: String,
    /// Number of NeuronCores (TPBs) the graph was compiled for.
    pub num_tpb: u32,
    /// The 32-byte hash field, as stored.
    pub hash: [u8; LEN_HASH],
    /// The 16-byte model UUID, as stored.
    pub uuid: [u8; LEN_UUID],
    /// The name recorded by the compiler (`file.neff` for most `neuronx-cc` outputs).
    pub name: String,
    /// NeuronCores requested at load time.
    pub requested_tpb_count: u32,
    /// Feature flags (offset 544).
    pub feature_bits: u64,
    /// Logical NeuronCore size the NEFF was compiled for (offset 552; 2 on Trn2 by default).
    pub lnc_size: u32,
}

impl NeffHeader {
    /// Decodes the header from the first [`HEADER_LEN`] bytes of a file.
    pub fn decode(bytes: &[u8; HEADER_LEN]) -> NeffHeader {
        NeffHeader {
            pkg_version: read_u64(bytes, OFF_PKG_VERSION),
            header_size: read_u64(bytes, OFF_HEADER_SIZE),
            data_size: read_u64(bytes, OFF_DATA_SIZE),
            neff_version_major: read_u64(bytes, OFF_VERSION_MAJOR),
            neff_version_minor: read_u64(bytes, OFF_VERSION_MINOR),
            build_version: read_cstr(&bytes[OFF_BUILD_VERSION..OFF_BUILD_VERSION + LEN_BUILD_VERSION]),
            num_tpb: read_u32(bytes, OFF_NUM_TPB),
            hash: read_array(bytes, OFF_HASH),
            uuid: read_array(bytes, OFF_UUID),
            name: read_cstr(&bytes[OFF_NAME..OFF_NAME + LEN_NAME]),
            requested_tpb_count: read_u32(bytes, OFF_REQUESTED_TPB_COUNT),
            feature_bits: read_u64(bytes, OFF_FEATURE_BITS),
            lnc_size: read_u32(bytes, OFF_LNC_SIZE),
        }
    }

    /// Encodes the header into [`HEADER_LEN`] bytes; strings longer than their field are cut
    /// so that a terminating NUL always fits.
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut out = [0u8; HEADER_LEN];
        out[OFF_PKG_VERSION..OFF_PKG_VERSION + 8].copy_from_slice(&self.pkg_version.to_le_bytes());
        out[OFF_HEADER_SIZE..OFF_HEADER_SIZE + 8].copy_from_slice(&self.header_size.to_le_bytes());
        out[OFF_DATA_SIZE..OFF_DATA_SIZE + 8].copy_from_slice(&self.data_size.to_le_bytes());
        out[OFF_VERSION_MAJOR..OFF_VERSION_MAJOR + 8].copy_from_slice(&self.neff_version_major.to_le_bytes());
        out[OFF_VERSION_MINOR..OFF_VERSION_MINOR + 8].copy_from_slice(&self.neff_version_minor.to_le_bytes());
        write_cstr(&mut out[OFF_BUILD_VERSION..OFF_BUILD_VERSION + LEN_BUILD_VERSION], &self.build_version);
        out[OFF_NUM_TPB..OFF_NUM_TPB + 4].copy_from_slice(&self.num_tpb.to_le_bytes());
        out[OFF_HASH..OFF_HASH + LEN_HASH].copy_from_slice(&self.hash);
        out[OFF_UUID..OFF_UUID + LEN_UUID].copy_from_slice(&self.uuid);
        write_cstr(&mut out[OFF_NAME..OFF_NAME + LEN_NAME], &self.name);
        out[OFF_REQUESTED_TPB_COUNT..OFF_REQUESTED_TPB_COUNT + 4]
            .copy_from_slice(&self.requested_tpb_count.to_le_bytes());
        out[OFF_FEATURE_BITS..OFF_FEATURE_BITS + 8].copy_from_slice(&self.feature_bits.to_le_bytes());
        out[OFF_LNC_SIZE..OFF_LNC_SIZE + 4].copy_from_slice(&self.lnc_size.to_le_bytes());
        out
    }

    /// The hash field as lowercase hex (64 characters).
    pub fn hash_hex(&self) -> String {
        to_hex(&self.hash)
    }

    /// The UUID field as lowercase hex (32 characters).
    pub fn uuid_hex(&self) -> String {
        to_hex(&self.uuid)
    }
}

fn read_array<const N: usize>(bytes: &[u8; HEADER_LEN], offset: usize) -> [u8; N] {
    let mut out = [0u8; N];
    out.copy_from_slice(&bytes[offset..offset + N]);
    out
}

fn read_u64(bytes: &[u8; HEADER_LEN], offset: usize) -> u64 {
    u64::from_le_bytes(read_array(bytes, offset))
}

fn read_u32(bytes: &[u8; HEADER_LEN], offset: usize) -> u32 {
    u32::from_le_bytes(read_array(bytes, offset))
}

/// A NUL-terminated (or field-long) string, decoded lossily.
fn read_cstr(field: &[u8]) -> String {
    let end = field.iter().position(|&b| b == 0).unwrap_or(field.len());
    String::from_utf8_lossy(&field[..end]).into_owned()
}

fn write_cstr(field: &mut [u8], value: &str) {
    let bytes = value.as_bytes();
    let len = bytes.len().min(field.len().saturating_sub(1));
    field[..len].copy_from_slice(&bytes[..len]);
}

fn to_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encode_decode_round_trip_keeps_every_field() {
        let header = NeffHeader {
            pkg_version: 2,
            header_size: 1024,
            data_size: 4242,
            neff_version_major: 2,
            neff_version_minor: 0,
            build_version: "1.2.3".into(),
            num_tpb: 1,
            hash: [0xab; 32],
            uuid: [0x01; 16],
            name: "model.neff".into(),
            requested_tpb_count: 1,
            feature_bits: 0x209c00,
            lnc_size: 2,
        };
        let bytes = header.encode();
        assert_eq!(&bytes[544..552], &0x209c00u64.to_le_bytes());
        assert_eq!(&bytes[552..556], &2u32.to_le_bytes());
        assert_eq!(NeffHeader::decode(&bytes), header);
        assert_eq!(header.uuid_hex(), "01".repeat(16));
    }

    #[test]
    fn overlong_name_is_cut_to_leave_a_nul() {
        let header = NeffHeader { name: "n".repeat(400), ..NeffHeader::decode(&[0u8; HEADER_LEN]) };
        let decoded = NeffHeader::decode(&header.encode());
        assert_eq!(decoded.name.len(), 255);
    }
}
