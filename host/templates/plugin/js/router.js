// {{name}}: a wasmgate router. Requests whose path starts with `prefix` go
// to the pool `pool`; the others get no route from it (the listener's
// `default_pool`, or 404).
//
// Settings (`[config]` in {{name}}.toml), checked by `init`:
// - `pool` (required): the pool to forward to.
// - `prefix`: the path prefix that matches (default `/`).

import { config } from 'wasmgate:plugin/host@0.3.0';

let settings = null;

export const lifecycle = {
  // Runs on each new instance, before its first request; a thrown string
  // refuses the plugin with that message.
  init() {
    const pool = config('pool') ?? '';
    if (!pool) throw 'bad config: pool: the pool to forward to is required';
    const prefix = config('prefix') ?? '/';
    if (!prefix.startsWith('/')) throw `bad config: prefix: \`${prefix}\` does not start with /`;
    settings = { pool, prefix };
  },
};

export const router = {
  route(req) {
    if (!req.path().startsWith(settings.prefix)) return { tag: 'no-route' };
    return {
      tag: 'forward',
      val: { pool: settings.pool, rewritePath: undefined, setHeaders: [], affinityKey: undefined },
    };
  },
};
