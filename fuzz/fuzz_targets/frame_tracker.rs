//! The relay's frame tracker (`websocket::relay::Frames`), which decides
//! where the gateway may put its own Close frame in a stream it does not
//! parse. For any valid frame stream cut into reads of any sizes, it is
//! between frames exactly at the frame boundaries and notices every Close;
//! for any bytes at all, it never panics and ends in the same state however
//! the bytes are cut.

#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use wasmgate::websocket::relay::Frames;

#[derive(Arbitrary, Debug)]
struct Frame {
    opcode: u8,
    /// 0..=125 inline; otherwise a 16-bit or 64-bit extended length.
    len: u16,
    long: bool,
    masked: bool,
}

#[derive(Arbitrary, Debug)]
struct Input {
    frames: Vec<Frame>,
    cuts: Vec<u16>,
    noise: Vec<u8>,
}

fn encode(frame: &Frame, out: &mut Vec<u8>) {
    let opcode = frame.opcode & 0x0f;
    out.push(0x80 | opcode);
    let mask_bit = if frame.masked { 0x80 } else { 0 };
    let len = u64::from(frame.len);
    if frame.long {
        // A 64-bit length (legal for any size), at most 65,535 + 70,000 bytes.
        let len = len + 70_000 * u64::from(frame.len % 2);
        out.push(mask_bit | 127);
        out.extend_from_slice(&len.to_be_bytes());
        if frame.masked {
            out.extend_from_slice(&[1, 2, 3, 4]);
        }
        out.resize(out.len() + len as usize, 0);
    } else if len <= 125 {
        out.push(mask_bit | len as u8);
        if frame.masked {
            out.extend_from_slice(&[1, 2, 3, 4]);
        }
        out.resize(out.len() + len as usize, 0);
    } else {
        out.push(mask_bit | 126);
        out.extend_from_slice(&(len as u16).to_be_bytes());
        if frame.masked {
            out.extend_from_slice(&[1, 2, 3, 4]);
        }
        out.resize(out.len() + len as usize, 0);
    }
}

/// Feeds `stream` in pieces of the sizes `cuts` gives (cycled), calling
/// `after` with the tracker and the offset after each piece.
fn feed_cut(stream: &[u8], cuts: &[u16], mut after: impl FnMut(&Frames, usize)) -> Frames {
    let mut tracker = Frames::default();
    let (mut at, mut i) = (0usize, 0usize);
    while at < stream.len() {
        let cut = cuts.get(i % cuts.len().max(1)).copied().unwrap_or(u16::MAX).max(1) as usize;
        let take = cut.min(stream.len() - at);
        tracker.feed(&stream[at..at + take]);
        at += take;
        i += 1;
        after(&tracker, at);
    }
    tracker
}

fuzz_target!(|input: Input| {
    let mut stream = Vec::new();
    let mut boundaries = std::collections::BTreeSet::from([0usize]);
    let mut closes = false;
    for frame in input.frames.iter().take(16) {
        encode(frame, &mut stream);
        boundaries.insert(stream.len());
        closes |= frame.opcode & 0x0f == 0x8;
    }
    let tracker = feed_cut(&stream, &input.cuts, |tracker, at| {
        assert_eq!(tracker.at_boundary(), boundaries.contains(&at), "after {at} of {} bytes", stream.len());
    });
    assert_eq!(tracker.saw_close(), closes);

    // Any bytes: one read or many, the same state.
    let mut whole = Frames::default();
    whole.feed(&input.noise);
    assert_eq!(feed_cut(&input.noise, &input.cuts, |_, _| {}), whole);
});
