"use strict";(self.rspackChunkipyparallel_lite=self.rspackChunkipyparallel_lite||[]).push([[700],{646(e,t,r){var n=r(601),i=r.n(n),o=r(314),a=(r.n(o))()(i());a.push([e.id,`.ipp-lite-panel {
  background: var(--jp-layout-color1);
  color: var(--jp-ui-font-color1);
  font-size: var(--jp-ui-font-size1);
  overflow-y: auto;
  padding: 8px;
}

.ipp-lite-header {
  font-size: var(--jp-ui-font-size2);
  font-weight: 600;
  margin-bottom: 6px;
  text-transform: uppercase;
}

.ipp-lite-new,
.ipp-lite-controls {
  display: flex;
  flex-wrap: wrap;
  gap: 4px;
  align-items: center;
  margin: 4px 0;
}

.ipp-lite-profile {
  width: 90px;
}

.ipp-lite-n {
  width: 48px;
}

.ipp-lite-panel button.jp-mod-styled {
  height: 24px;
  line-height: 24px;
  padding: 0 8px;
}

.ipp-lite-cluster {
  border: 1px solid var(--jp-border-color2);
  border-radius: 4px;
  margin: 8px 0;
  padding: 6px;
}

.ipp-lite-cluster[data-state='running'] {
  border-left: 4px solid var(--jp-success-color1);
}

.ipp-lite-cluster-title {
  font-weight: 600;
}

.ipp-lite-cluster-status,
.ipp-lite-totals,
.ipp-lite-empty {
  color: var(--jp-ui-font-color2);
  margin: 2px 0;
}

.ipp-lite-error {
  color: var(--jp-error-color1);
  white-space: pre-wrap;
}

.ipp-lite-engines-scroll {
  overflow-x: auto;
}

.ipp-lite-engines {
  border-collapse: collapse;
  width: 100%;
  margin-top: 4px;
  font-size: 11px;
  font-variant-numeric: tabular-nums;
}

.ipp-lite-engines td:nth-child(3) {
  max-width: 80px;
  overflow: hidden;
  text-overflow: ellipsis;
  white-space: nowrap;
}

.ipp-lite-engines th,
.ipp-lite-engines td {
  border-bottom: 1px solid var(--jp-border-color3);
  padding: 1px 3px;
  text-align: right;
}

.ipp-lite-engines th:nth-child(2),
.ipp-lite-engines td:nth-child(2),
.ipp-lite-engines th:nth-child(3),
.ipp-lite-engines td:nth-child(3) {
  text-align: left;
}

.ipp-lite-engine.ipp-lite-busy td:nth-child(2) {
  color: var(--jp-warn-color1);
  font-weight: 600;
}
`,""]),r.d(t,{},{A:a})},314(e){e.exports=function(e){var t=[];return t.toString=function(){return this.map(function(t){var r="",n=void 0!==t[5];return t[4]&&(r+="@supports (".concat(t[4],") {")),t[2]&&(r+="@media ".concat(t[2]," {")),n&&(r+="@layer".concat(t[5].length>0?" ".concat(t[5]):""," {")),r+=e(t),n&&(r+="}"),t[2]&&(r+="}"),t[4]&&(r+="}"),r}).join("")},t.i=function(e,r,n,i,o){"string"==typeof e&&(e=[[null,e,void 0]]);var a={};if(n)for(var p=0;p<this.length;p++){var l=this[p][0];null!=l&&(a[l]=!0)}for(var s=0;s<e.length;s++){var c=[].concat(e[s]);n&&a[c[0]]||(void 0!==o&&(void 0===c[5]||(c[1]="@layer".concat(c[5].length>0?" ".concat(c[5]):""," {").concat(c[1],"}")),c[5]=o),r&&(c[2]&&(c[1]="@media ".concat(c[2]," {").concat(c[1],"}")),c[2]=r),i&&(c[4]?(c[1]="@supports (".concat(c[4],") {").concat(c[1],"}"),c[4]=i):c[4]="".concat(i)),t.push(c))}},t}},601(e){e.exports=function(e){return e[1]}},72(e){var t=[];function r(e){for(var r=-1,n=0;n<t.length;n++)if(t[n].identifier===e){r=n;break}return r}function n(e,n){for(var i={},o=[],a=0;a<e.length;a++){var p=e[a],l=n.base?p[0]+n.base:p[0],s=i[l]||0,c="".concat(l," ").concat(s);i[l]=s+1;var u=r(c),d={css:p[1],media:p[2],sourceMap:p[3],supports:p[4],layer:p[5]};if(-1!==u)t[u].references++,t[u].updater(d);else{var f=function(e,t){var r=t.domAPI(t);return r.update(e),function(t){t?(t.css!==e.css||t.media!==e.media||t.sourceMap!==e.sourceMap||t.supports!==e.supports||t.layer!==e.layer)&&r.update(e=t):r.remove()}}(d,n);n.byIndex=a,t.splice(a,0,{identifier:c,updater:f,references:1})}o.push(c)}return o}e.exports=function(e,i){var o=n(e=e||[],i=i||{});return function(e){e=e||[];for(var a=0;a<o.length;a++){var p=r(o[a]);t[p].references--}for(var l=n(e,i),s=0;s<o.length;s++){var c=r(o[s]);0===t[c].references&&(t[c].updater(),t.splice(c,1))}o=l}}},659(e){var t={};e.exports=function(e,r){var n=function(e){if(void 0===t[e]){var r=document.querySelector(e);if(window.HTMLIFrameElement&&r instanceof window.HTMLIFrameElement)try{r=r.contentDocument.head}catch(e){r=null}t[e]=r}return t[e]}(e);if(!n)throw Error("Couldn't find a style target. This probably means that the value for the 'insert' parameter is invalid.");n.appendChild(r)}},540(e){e.exports=function(e){var t=document.createElement("style");return e.setAttributes(t,e.attributes),e.insert(t,e.options),t}},56(e,t,r){e.exports=function(e){var t=r.nc;t&&e.setAttribute("nonce",t)}},825(e){e.exports=function(e){if("u"<typeof document)return{update:function(){},remove:function(){}};var t=e.insertStyleElement(e);return{update:function(r){var n,i,o;n="",r.supports&&(n+="@supports (".concat(r.supports,") {")),r.media&&(n+="@media ".concat(r.media," {")),(i=void 0!==r.layer)&&(n+="@layer".concat(r.layer.length>0?" ".concat(r.layer):""," {")),n+=r.css,i&&(n+="}"),r.media&&(n+="}"),r.supports&&(n+="}"),(o=r.sourceMap)&&"u">typeof btoa&&(n+="\n/*# sourceMappingURL=data:application/json;base64,".concat(btoa(unescape(encodeURIComponent(JSON.stringify(o))))," */")),e.styleTagTransform(n,t,e.options)},remove:function(){var e;null===(e=t).parentNode||e.parentNode.removeChild(e)}}}},113(e){e.exports=function(e,t){if(t.styleSheet)t.styleSheet.cssText=e;else{for(;t.firstChild;)t.removeChild(t.firstChild);t.appendChild(document.createTextNode(e))}}},959(e,t,r){var n=r(72),i=r.n(n),o=r(825),a=r.n(o),p=r(659),l=r.n(p),s=r(56),c=r.n(s),u=r(540),d=r.n(u),f=r(113),h=r.n(f),v=r(646),m={};m.styleTagTransform=h(),m.setAttributes=c(),m.insert=l().bind(null,"head"),m.domAPI=a(),m.insertStyleElement=d(),i()(v.A,m),v.A&&v.A.locals&&v.A.locals}}]);