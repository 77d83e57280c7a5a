// {{name}}: a wasmgate WAF. Requests whose path starts with `deny_prefix`
// are refused with 403; the others go on to the router.
//
// Settings (`[config]` in {{name}}.toml), checked by `init`:
// - `deny_prefix`: the path prefix refused (default `/admin`).

import { config, log } from 'wasmgate:plugin/host@0.3.0';

let denyPrefix = null;

export const lifecycle = {
  // Runs on each new instance, before its first request; a thrown string
  // refuses the plugin with that message.
  init() {
    const prefix = config('deny_prefix') ?? '/admin';
    if (!prefix.startsWith('/')) throw `bad config: deny_prefix: \`${prefix}\` does not start with /`;
    denyPrefix = prefix;
  },
};

export const waf = {
  inspect(req) {
    if (!req.path().startsWith(denyPrefix)) return { tag: 'allow' };
    log('info', `refused ${req.path()} from ${req.clientIp()}`);
    return {
      tag: 'deny',
      val: {
        status: 403,
        headers: [{ name: 'content-type', value: 'text/plain; charset=utf-8' }],
        body: new TextEncoder().encode('forbidden\n'),
      },
    };
  },
};
