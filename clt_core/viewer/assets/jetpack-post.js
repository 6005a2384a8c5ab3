// clt serve, after vendor/d3-jetpack.js: d3-jetpack on d3 v7 as circuit-tracer's viewer uses it (it was written
// against Anthropic's own jetpack build, jetpack_2024-07-20.js, which is not published in a registry).
// - the bundle's exports join d3 where d3 has no name of its own (its timer wrappers would call themselves);
// - nestBy: d3.nest is gone from d3 v6+; d3.groups keeps the keys in first-seen order, as nest did;
// - attachTooltip: since d3 v6 a listener gets (event, datum), not d3.event;
// - conventions: the returned object also has drawAxis(svg = c.svg), which the viewer calls.
(function () {
  var jetpack = window.module.exports
  delete window.module
  delete window.exports
  delete window.require
  var d3 = window.d3
  Object.keys(jetpack).forEach(function (key) {
    if (!(key in d3)) d3[key] = jetpack[key]
  })

  d3.nestBy = function (array, key) {
    return d3.groups(array, key).map(function (group) {
      var values = group[1]
      values.key = group[0]
      return values
    })
  }

  d3.attachTooltip = function (sel, tooltipSel, fieldFns) {
    if (!sel.size()) return
    tooltipSel = tooltipSel || d3.select('.tooltip')
    var datum = sel.datum()
    fieldFns = fieldFns || Object.keys(datum)
      .filter(function (k) { return typeof datum[k] != 'object' })
      .map(function (k) { return function (d) { return k + ': <b>' + d[k] + '</b>' } })

    sel
      .on('mouseover.attachTooltip', function (ev, d) {
        tooltipSel.classed('tooltip-hidden', false).html('')
          .appendMany('div', fieldFns).html(function (fn) { return fn(d) })
        d3.select(this).classed('tooltipped', true)
      })
      .on('mousemove.attachTooltip', function (ev) {
        if (!tooltipSel.size()) return
        var bb = tooltipSel.node().getBoundingClientRect()
        var left = d3.clamp(20, ev.clientX - bb.width / 2, window.innerWidth - bb.width - 20)
        var top = window.innerHeight > ev.clientY + 20 + bb.height ? ev.clientY + 20 : ev.clientY - bb.height - 20
        tooltipSel.style('left', left + 'px').style('top', top + 'px')
      })
      .on('mouseout.attachTooltip', function () {
        tooltipSel.classed('tooltip-hidden', true)
        d3.selectAll('.tooltipped').classed('tooltipped', false)
      })
  }

  var conventions = jetpack.conventions
  d3.conventions = function (options) {
    var c = conventions(options)
    c.drawAxis = function (svg) {
      return jetpack.drawAxis(Object.assign({}, c, {svg: svg || c.svg}))
    }
    return c
  }
})()
