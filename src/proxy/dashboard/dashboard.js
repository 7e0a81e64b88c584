// llmctl serve-proxy dashboard: polls dashboard/data.json once a second and draws its points on <canvas>.
// No library: five small charts do not need one, and the page must work with no network but the proxy.
//
// Each canvas carries what it drew, for tests and for anyone reading the page's DOM: data-points (non-empty
// values drawn per series), data-last (the newest value per series) and data-sum (their sum per series).
'use strict';

(() => {
  const KEY_STORE = 'llmctl-proxy-key';
  const POLL_MS = 1000;

  // Per chart: its series and how to read each from a point of data.json.
  const up = (f) => (p) => (p.upstream ? f(p.upstream) : null);
  const pct = (v) => (v == null ? null : 100 * v);
  const CHARTS = [
    {
      id: 'chart-gen', unit: 'tok/s', series: [
        { name: 'proxy', label: 'proxy: per request that ended', color: '#2b7bb9', get: (p) => p.gen_tps },
        { name: 'upstream', label: 'llama-server', color: '#e8710a', get: up((u) => u.gen_tps) },
      ],
    },
    {
      id: 'chart-prefill', unit: 'tok/s', upstreamOnly: true, series: [
        { name: 'upstream', label: 'llama-server (uncached prompt tokens)', color: '#8e44ad', get: up((u) => u.prefill_tps) },
      ],
    },
    {
      id: 'chart-ttft', unit: 'ms', series: [
        { name: 'proxy', label: 'proxy: mean of the requests that ended', color: '#16a085', get: (p) => p.ttft_ms },
      ],
    },
    {
      id: 'chart-cache', unit: '%', max: 100, series: [
        { name: 'proxy', label: 'proxy: cached / prompt tokens', color: '#2b7bb9', get: (p) => pct(p.cache_reuse) },
        { name: 'upstream', label: 'llama-server, last 10 s', color: '#e8710a', get: upstreamReuse },
      ],
    },
    {
      id: 'chart-requests', unit: '/s', bars: true, series: [
        { name: 'requests', label: 'requests', color: '#7f8c8d', get: (p) => p.requests },
        { name: 'errors', label: 'errors', color: '#c0392b', get: (p) => p.errors },
      ],
    },
  ];

  // llama-server counts a request's cached tokens when its prompt is loaded and the processed ones as each batch
  // ends, often in another second: one second's ratio swings between 0 and 100 %. Its reuse is drawn over the
  // seconds with prompt work in the last 10 s instead, at each second that had some.
  const REUSE_WINDOW = 10;
  function upstreamReuse(p, j) {
    const u = p.upstream;
    if (!u || u.cached_tokens == null || !(u.prompt_tokens + u.cached_tokens > 0)) return null;
    let cached = 0, total = 0;
    for (let k = Math.max(0, j - REUSE_WINDOW + 1); k <= j; k++) {
      const q = points[k].upstream;
      if (!q || q.cached_tokens == null || points[k].t <= p.t - REUSE_WINDOW * intervalMs) continue;
      cached += q.cached_tokens;
      total += q.prompt_tokens + q.cached_tokens;
    }
    return total > 0 ? (100 * cached) / total : null;
  }

  const $ = (id) => document.getElementById(id);
  let points = [];
  let capacity = 600;
  let intervalMs = 1000;
  let since = 0;
  let now = 0;
  let upstream = { status: 'waiting', detail: null };
  let timer = null;

  function setStatus(state, text) {
    const el = $('status');
    el.dataset.state = state;
    el.textContent = text;
  }

  function fmt(v) {
    if (v == null || !Number.isFinite(v)) return '–';
    if (Number.isInteger(v)) return v.toLocaleString('en-US');
    const a = Math.abs(v);
    if (a >= 1000) return Math.round(v).toLocaleString('en-US');
    if (a >= 100) return v.toFixed(0);
    if (a >= 10) return v.toFixed(1);
    return v.toFixed(2).replace(/\.?0+$/, '') || '0';
  }

  function setValue(id, value, text) {
    const el = $(id);
    el.dataset.value = value == null ? '' : String(value);
    el.textContent = text;
  }

  function showKeyForm(message) {
    const form = $('key-form');
    form.hidden = false;
    const err = $('key-error');
    err.hidden = !message;
    err.textContent = message || '';
    $('key').focus();
  }

  function schedule() {
    clearTimeout(timer);
    timer = setTimeout(poll, POLL_MS);
  }

  async function poll() {
    const key = sessionStorage.getItem(KEY_STORE);
    const headers = key ? { Authorization: 'Bearer ' + key } : {};
    let res;
    try {
      res = await fetch('dashboard/data.json?since=' + since, { headers, cache: 'no-store' });
    } catch (e) {
      setStatus('offline', 'the proxy does not answer');
      schedule();
      return;
    }
    if (res.status === 401) {
      // Polling stops until a key is given: a wrong key must not be retried every second.
      if (key) sessionStorage.removeItem(KEY_STORE);
      setStatus('locked', 'API key required');
      showKeyForm(key ? 'The proxy refused that key.' : '');
      return;
    }
    if (!res.ok) {
      setStatus('error', 'data.json answered ' + res.status);
      schedule();
      return;
    }
    let data;
    try {
      data = await res.json();
    } catch (e) {
      setStatus('error', 'data.json is not JSON');
      schedule();
      return;
    }
    $('key-form').hidden = true;
    ingest(data);
    render(data);
    setStatus('live', 'live');
    schedule();
  }

  function ingest(data) {
    capacity = data.capacity;
    intervalMs = data.interval_ms;
    now = data.now;
    upstream = data.upstream_metrics;
    // A proxy that restarted numbers its points from a new start: begin again.
    if (data.points.length && points.length && data.points[0].t <= points[points.length - 1].t) points = [];
    for (const p of data.points) points.push(p);
    if (points.length > capacity) points.splice(0, points.length - capacity);
    if (points.length) since = points[points.length - 1].t;
  }

  function render(data) {
    const t = data.totals;
    setValue('total-requests', t.requests, fmt(t.requests));
    setValue('total-errors', t.errors, fmt(t.errors));
    setValue('total-in-flight', t.in_flight, fmt(t.in_flight));
    setValue('total-output-tokens', t.output_tokens, fmt(t.output_tokens));
    setValue('total-gen-tps', t.gen_tps, t.gen_tps == null ? '–' : fmt(t.gen_tps) + ' tok/s');
    setValue('total-ttft', t.ttft_ms, t.ttft_ms == null ? '–' : fmt(t.ttft_ms) + ' ms');
    setValue('total-cache-reuse', t.cache_reuse, t.cache_reuse == null ? '–' : fmt(100 * t.cache_reuse) + ' %');
    const types = Object.entries(t.errors_by_type).map(([k, n]) => k + ' ' + n);
    $('errors-by-type').textContent = types.length ? 'errors by type: ' + types.join(', ') : '';
    $('meta').textContent = 'v' + data.proxy.version + ' · upstream ' + data.proxy.upstream +
      ' · up ' + fmt(data.proxy.uptime_secs / 60) + ' min';
    const us = $('upstream-status');
    us.dataset.state = upstream.status;
    us.textContent = {
      ok: 'llama-server figures: from its /metrics.',
      waiting: 'llama-server figures: reading its /metrics…',
      unavailable: "The upstream's figures are not available (" + upstream.detail +
        '); showing the proxy\'s own. llama-server gives them when started with --metrics.',
    }[upstream.status] || '';
    $('replicas').textContent = replicaLine(data.replicas || []);
    for (const c of CHARTS) draw(c);
  }

  // One line per replica when serve-proxy routes across several: state, slots in use, requests, its cache
  // reuse and why requests went there (docs/proxy.md, "Routing across replicas").
  function replicaLine(replicas) {
    if (replicas.length < 2) return '';
    return 'replicas: ' + replicas.map((r) => {
      const reuse = r.prompt_tokens ? fmt(100 * r.cached_prompt_tokens / r.prompt_tokens) + ' % cached' : 'no prompts yet';
      const why = Object.entries(r.decisions).map(([k, n]) => k + ' ' + n).join(', ');
      return r.url + (r.up ? '' : ' (down)') + ' · ' + r.in_flight + '/' + r.slots + ' slots busy · ' +
        fmt(r.requests) + ' requests, ' + fmt(r.errors) + ' errors · ' + reuse + ' · ' + why;
    }).join(' | ');
  }

  function niceMax(v) {
    if (!(v > 0)) return 1;
    const p = Math.pow(10, Math.floor(Math.log10(v)));
    for (const m of [1, 2, 2.5, 5, 10]) if (m * p >= v) return m * p;
    return 10 * p;
  }

  function draw(chart) {
    const canvas = $(chart.id);
    const css = getComputedStyle(document.documentElement);
    const fg = css.getPropertyValue('--muted').trim() || '#666';
    const grid = css.getPropertyValue('--line').trim() || '#ddd';
    const dpr = window.devicePixelRatio || 1;
    const w = canvas.clientWidth || 400;
    const h = canvas.clientHeight || 180;
    if (canvas.width !== Math.round(w * dpr)) canvas.width = Math.round(w * dpr);
    if (canvas.height !== Math.round(h * dpr)) canvas.height = Math.round(h * dpr);
    const ctx = canvas.getContext('2d');
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    ctx.clearRect(0, 0, w, h);

    const left = 48, right = 8, top = 8, bottom = 20;
    const pw = w - left - right, ph = h - top - bottom;
    const span = capacity * intervalMs;
    const t0 = now - span;
    const x = (t) => left + ((t - t0) / span) * pw;

    const values = chart.series.map((s) => points.map((p, j) => {
      const v = s.get(p, j);
      return v == null || !Number.isFinite(v) ? null : v;
    }));
    let max = chart.max || 0;
    if (!chart.max) for (const vs of values) for (const v of vs) if (v != null && v > max) max = v;
    max = chart.max || niceMax(max * 1.05);
    const y = (v) => top + ph - (Math.min(v, max) / max) * ph;

    // Grid and axis labels.
    ctx.font = '11px system-ui, sans-serif';
    ctx.fillStyle = fg;
    ctx.strokeStyle = grid;
    ctx.lineWidth = 1;
    ctx.textAlign = 'right';
    ctx.textBaseline = 'middle';
    for (const f of [0, 0.5, 1]) {
      const yy = Math.round(top + ph - f * ph) + 0.5;
      ctx.beginPath(); ctx.moveTo(left, yy); ctx.lineTo(left + pw, yy); ctx.stroke();
      ctx.fillText(fmt(f * max) + (chart.unit === '%' ? '%' : ''), left - 4, yy);
    }
    ctx.textAlign = 'center';
    ctx.textBaseline = 'top';
    for (const [f, label, align] of [[0, '-10 min', 'left'], [0.5, '-5 min', 'center'], [1, 'now', 'right']]) {
      ctx.textAlign = align;
      ctx.fillText(label, left + f * pw, top + ph + 4);
    }

    const drawn = {}, last = {}, sum = {};
    chart.series.forEach((s, i) => {
      drawn[s.name] = 0; last[s.name] = null; sum[s.name] = 0;
      ctx.strokeStyle = s.color;
      ctx.fillStyle = s.color;
      ctx.lineWidth = 1.5;
      const barW = Math.max(1, (pw / capacity) * 0.8);
      let prev = null;
      points.forEach((p, j) => {
        const v = values[i][j];
        if (v == null) { prev = null; return; }
        const xx = x(p.t);
        if (xx < left) return;
        drawn[s.name] += 1; last[s.name] = v; sum[s.name] += v;
        if (chart.bars) {
          if (v > 0) ctx.fillRect(xx - barW, y(v), barW, top + ph - y(v));
          return;
        }
        // Consecutive values are joined; a lone value (one request in a quiet minute) is a dot.
        if (prev && p.t - prev.t <= intervalMs * 1.5) {
          ctx.beginPath(); ctx.moveTo(prev.x, prev.y); ctx.lineTo(xx, y(v)); ctx.stroke();
        }
        ctx.beginPath(); ctx.arc(xx, y(v), 2.5, 0, 2 * Math.PI); ctx.fill();
        prev = { t: p.t, x: xx, y: y(v) };
      });
    });
    const total = Object.values(drawn).reduce((a, b) => a + b, 0);
    if (total === 0) {
      ctx.fillStyle = fg;
      ctx.textAlign = 'center';
      ctx.textBaseline = 'middle';
      const text = chart.upstreamOnly && upstream.status === 'unavailable'
        ? "not available: needs the upstream's /metrics"
        : 'nothing yet';
      ctx.fillText(text, left + pw / 2, top + ph / 2);
    }
    canvas.dataset.points = JSON.stringify(drawn);
    canvas.dataset.last = JSON.stringify(last);
    canvas.dataset.sum = JSON.stringify(sum);

    const legend = canvas.nextElementSibling;
    if (!legend.childElementCount) {
      for (const s of chart.series) {
        const item = document.createElement('span');
        const swatch = document.createElement('i');
        swatch.style.background = s.color;
        item.append(swatch, s.label);
        legend.append(item);
      }
    }
  }

  $('key-form').addEventListener('submit', (e) => {
    e.preventDefault();
    const input = $('key');
    const key = input.value.trim();
    input.value = '';
    if (!key) return;
    sessionStorage.setItem(KEY_STORE, key);
    $('key-form').hidden = true;
    setStatus('connecting', 'connecting…');
    poll();
  });
  window.addEventListener('resize', () => { for (const c of CHARTS) draw(c); });
  poll();
})();
