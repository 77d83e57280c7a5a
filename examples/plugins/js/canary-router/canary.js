// canary-router: sends a share of the traffic to a canary pool, the same
// clients always to the same side, with a header to force either side.
//
// Settings (`[config]` in canary-router.toml), checked by `init`:
// - `canary` (required): the canary pool.
// - `percent` (required): 0-100, the share of clients sent to it.
// - `stable`: the pool everyone else goes to (default `app`).
// - `sticky`: what keeps a client on its side: `client-ip` (default) or
//   `cookie:NAME` (the cookie's value; clients without it fall back to
//   their IP).
// - `override_header`: a request header that forces a side when it says
//   `canary` or `stable` (default `x-canary`).
//
// Each client is hashed (FNV-1a) into one of 100 buckets; buckets below
// `percent` go to the canary. The chosen side is sent to the backend in
// `x-canary-side`.

import { config } from 'wasmgate:plugin/host@0.3.0';

let settings = null;

function parseSettings() {
  const canary = (config('canary') ?? '').trim();
  if (!canary) throw 'bad config: canary: the canary pool is required';
  const percentText = (config('percent') ?? '').trim();
  if (!/^\d{1,3}$/.test(percentText) || Number(percentText) > 100) {
    throw `bad config: percent: \`${percentText}\` is not a whole number from 0 to 100`;
  }
  const sticky = (config('sticky') ?? 'client-ip').trim();
  let cookie = null;
  if (sticky.startsWith('cookie:') && sticky.length > 'cookie:'.length) {
    cookie = sticky.slice('cookie:'.length);
  } else if (sticky !== 'client-ip') {
    throw `bad config: sticky: \`${sticky}\` is not \`client-ip\` or \`cookie:NAME\``;
  }
  return {
    canary,
    stable: (config('stable') ?? 'app').trim(),
    percent: Number(percentText),
    cookie,
    overrideHeader: (config('override_header') ?? 'x-canary').trim().toLowerCase(),
  };
}

// 32-bit FNV-1a over the UTF-16 code units of `text`.
function bucket(text) {
  let hash = 0x811c9dc5;
  for (let i = 0; i < text.length; i++) {
    hash ^= text.charCodeAt(i);
    hash = Math.imul(hash, 0x01000193) >>> 0;
  }
  return hash % 100;
}

function cookieValue(header, name) {
  for (const pair of (header ?? '').split(';')) {
    const [key, ...rest] = pair.trim().split('=');
    if (key === name) return rest.join('=');
  }
  return null;
}

function forward(pool, side) {
  return {
    tag: 'forward',
    val: { pool, rewritePath: undefined, setHeaders: [{ name: 'x-canary-side', value: side }], affinityKey: undefined },
  };
}

export const lifecycle = {
  init() {
    settings = parseSettings();
  },
};

export const router = {
  route(req) {
    const forced = req.header(settings.overrideHeader);
    if (forced === 'canary') return forward(settings.canary, 'canary');
    if (forced === 'stable') return forward(settings.stable, 'stable');
    let key = null;
    if (settings.cookie !== null) key = cookieValue(req.header('cookie'), settings.cookie);
    if (key === null || key === '') key = req.clientIp();
    return bucket(key) < settings.percent
      ? forward(settings.canary, 'canary')
      : forward(settings.stable, 'stable');
  },
};
