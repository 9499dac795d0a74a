//! A carrier-grade NAT's rebinding, as the WAN lab does it: the node's UDP source ports are
//! mapped to other ports, and a rebinding changes the mapping at once, as when a cellular
//! network's NAT forgets a binding or moves the flow to another public port. Replies to the
//! old mapping reach nothing, just as a real NAT drops them.
//!
//! The mapping is stateless (`port ^ key`), so it needs no table and no bound: a new key is a
//! new binding for every flow. Only UDP over IPv4 is rebound: NATs keep TCP bindings for hours,
//! and a rebound TCP connection is simply dead for every path alike.

/// Offset of the protocol field and the UDP header within an IPv4 packet.
const IPV4_PROTO: usize = 9;
const UDP: u8 = 17;

/// The UDP header of an IPv4 packet: where it starts, if the packet is UDP and long enough.
fn udp_header(packet: &[u8]) -> Option<usize> {
    let first = *packet.first()?;
    if first >> 4 != 4 || *packet.get(IPV4_PROTO)? != UDP {
        return None;
    }
    let ihl = usize::from(first & 0x0f) * 4;
    (packet.len() >= ihl + 8).then_some(ihl)
}

/// Rewrites the 16-bit field at `at` (a port) to `new`, fixing the UDP checksum at `sum`
/// incrementally (RFC 1624). A zero checksum means "none" in IPv4 and stays zero.
fn rewrite(packet: &mut [u8], at: usize, sum: usize, new: u16) {
    let old = u16::from_be_bytes([packet[at], packet[at + 1]]);
    packet[at..at + 2].copy_from_slice(&new.to_be_bytes());
    let hc = u16::from_be_bytes([packet[sum], packet[sum + 1]]);
    if hc == 0 {
        return;
    }
    let mut acc = u32::from(!hc) + u32::from(!old) + u32::from(new);
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    let mut out = !(acc as u16);
    if out == 0 {
        out = 0xffff;
    }
    packet[sum..sum + 2].copy_from_slice(&out.to_be_bytes());
}

/// A packet leaving the node: its UDP source port is mapped with `key` (0: no NAT).
pub fn outbound(packet: &mut [u8], key: u16) {
    if key == 0 {
        return;
    }
    if let Some(h) = udp_header(packet) {
        let port = u16::from_be_bytes([packet[h], packet[h + 1]]);
        rewrite(packet, h, h + 6, port ^ key);
    }
}

/// A packet towards the node: its UDP destination port is mapped back with `key`.
pub fn inbound(packet: &mut [u8], key: u16) {
    if key == 0 {
        return;
    }
    if let Some(h) = udp_header(packet) {
        let port = u16::from_be_bytes([packet[h + 2], packet[h + 3]]);
        rewrite(packet, h + 2, h + 6, port ^ key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A UDP/IPv4 packet with a correct checksum.
    fn packet(sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
        let src = [198, 18, 200, 1];
        let dst = [198, 18, 200, 2];
        let len = 8 + payload.len();
        let mut p = vec![0x45, 0, 0, 0, 0, 0, 0, 0, 64, UDP, 0, 0];
        p.extend_from_slice(&src);
        p.extend_from_slice(&dst);
        p.extend_from_slice(&sport.to_be_bytes());
        p.extend_from_slice(&dport.to_be_bytes());
        p.extend_from_slice(&(len as u16).to_be_bytes());
        p.extend_from_slice(&[0, 0]);
        p.extend_from_slice(payload);
        let sum = checksum(&p);
        p[26..28].copy_from_slice(&sum.to_be_bytes());
        p
    }

    /// The UDP checksum computed from scratch (pseudo-header, header with zero sum, payload).
    fn checksum(p: &[u8]) -> u16 {
        let udp = &p[20..];
        let mut words: Vec<u8> = Vec::new();
        words.extend_from_slice(&p[12..20]);
        words.extend_from_slice(&[0, UDP]);
        words.extend_from_slice(&(udp.len() as u16).to_be_bytes());
        words.extend_from_slice(&udp[..6]);
        words.extend_from_slice(&[0, 0]);
        words.extend_from_slice(&udp[8..]);
        if words.len() % 2 == 1 {
            words.push(0);
        }
        let mut acc: u32 = words
            .chunks(2)
            .map(|w| u32::from(u16::from_be_bytes([w[0], w[1]])))
            .sum();
        while acc > 0xffff {
            acc = (acc & 0xffff) + (acc >> 16);
        }
        let s = !(acc as u16);
        if s == 0 {
            0xffff
        } else {
            s
        }
    }

    #[test]
    fn a_rebinding_maps_ports_with_valid_checksums_and_back() {
        for (sport, key) in [(40000u16, 0x1234u16), (1, 0xffff), (65535, 0x0f0f)] {
            let original = packet(sport, 9443, b"hello, odd length");
            let mut p = original.clone();
            outbound(&mut p, key);
            assert_eq!(u16::from_be_bytes([p[20], p[21]]), sport ^ key);
            assert_eq!(u16::from_be_bytes([p[26], p[27]]), checksum(&p));
            // The reply comes back to the mapped port and is mapped back.
            let mut reply = packet(9443, sport ^ key, b"hi");
            inbound(&mut reply, key);
            assert_eq!(u16::from_be_bytes([reply[22], reply[23]]), sport);
            assert_eq!(u16::from_be_bytes([reply[26], reply[27]]), checksum(&reply));
        }
    }

    #[test]
    fn other_packets_and_short_ones_pass_untouched() {
        let mut tcp = packet(40000, 9443, b"x");
        tcp[IPV4_PROTO] = 6;
        let before = tcp.clone();
        outbound(&mut tcp, 7);
        assert_eq!(tcp, before);
        let mut short = vec![0x45, 0, 0, 0, 0, 0, 0, 0, 64, UDP];
        outbound(&mut short, 7);
        inbound(&mut [], 7);
    }
}
