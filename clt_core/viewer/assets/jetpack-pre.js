// clt serve, before vendor/d3-jetpack.js: that build is a UMD bundle whose browser-global branch replaces window.d3
// with an empty object, so it is loaded through its CommonJS branch instead, every `require` of a d3 module answered
// by the global d3 (v7). jetpack-post.js takes its exports and removes these three globals again.
window.module = {exports: {}}
window.exports = window.module.exports
window.require = function () { return window.d3 }
