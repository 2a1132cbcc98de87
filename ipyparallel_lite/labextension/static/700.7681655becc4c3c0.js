"use strict";(self.rspackChunkipyparallel_lite=self.rspackChunkipyparallel_lite||[]).push([[700],{646(t,e,i){var r=i(601),n=i.n(r),o=i(314),p=(i.n(o))()(n());p.push([t.id,`.ipp-lite-panel {
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

.ipp-lite-table-scroll {
  overflow-x: auto;
}

.ipp-lite-tasks-title {
  color: var(--jp-ui-font-color2);
  margin: 6px 0 0;
}

.ipp-lite-tasks-empty {
  color: var(--jp-ui-font-color3);
  font-size: 11px;
}

.ipp-lite-tasks-scroll {
  max-height: 360px;
  overflow-y: auto;
}

.ipp-lite-engines,
.ipp-lite-tasks {
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
.ipp-lite-engines td,
.ipp-lite-tasks th,
.ipp-lite-tasks td {
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

.ipp-lite-tasks th:nth-child(-n + 2),
.ipp-lite-tasks td:nth-child(-n + 2) {
  text-align: left;
}

.ipp-lite-tasks td:first-child {
  max-width: 110px;
  overflow: hidden;
  text-overflow: ellipsis;
  white-space: nowrap;
}

.ipp-lite-task-running td:nth-child(2),
.ipp-lite-task-pending td:nth-child(2) {
  color: var(--jp-warn-color1);
}

.ipp-lite-task-error td:nth-child(2),
.ipp-lite-task-aborted td:nth-child(2),
.ipp-lite-task-lost td:nth-child(2) {
  color: var(--jp-error-color1);
}
`,""]),i.d(e,{},{A:p})},314(t){t.exports=function(t){var e=[];return e.toString=function(){return this.map(function(e){var i="",r=void 0!==e[5];return e[4]&&(i+="@supports (".concat(e[4],") {")),e[2]&&(i+="@media ".concat(e[2]," {")),r&&(i+="@layer".concat(e[5].length>0?" ".concat(e[5]):""," {")),i+=t(e),r&&(i+="}"),e[2]&&(i+="}"),e[4]&&(i+="}"),i}).join("")},e.i=function(t,i,r,n,o){"string"==typeof t&&(t=[[null,t,void 0]]);var p={};if(r)for(var a=0;a<this.length;a++){var l=this[a][0];null!=l&&(p[l]=!0)}for(var s=0;s<t.length;s++){var c=[].concat(t[s]);r&&p[c[0]]||(void 0!==o&&(void 0===c[5]||(c[1]="@layer".concat(c[5].length>0?" ".concat(c[5]):""," {").concat(c[1],"}")),c[5]=o),i&&(c[2]&&(c[1]="@media ".concat(c[2]," {").concat(c[1],"}")),c[2]=i),n&&(c[4]?(c[1]="@supports (".concat(c[4],") {").concat(c[1],"}"),c[4]=n):c[4]="".concat(n)),e.push(c))}},e}},601(t){t.exports=function(t){return t[1]}},72(t){var e=[];function i(t){for(var i=-1,r=0;r<e.length;r++)if(e[r].identifier===t){i=r;break}return i}function r(t,r){for(var n={},o=[],p=0;p<t.length;p++){var a=t[p],l=r.base?a[0]+r.base:a[0],s=n[l]||0,c="".concat(l," ").concat(s);n[l]=s+1;var d=i(c),u={css:a[1],media:a[2],sourceMap:a[3],supports:a[4],layer:a[5]};if(-1!==d)e[d].references++,e[d].updater(u);else{var h=function(t,e){var i=e.domAPI(e);return i.update(t),function(e){e?(e.css!==t.css||e.media!==t.media||e.sourceMap!==t.sourceMap||e.supports!==t.supports||e.layer!==t.layer)&&i.update(t=e):i.remove()}}(u,r);r.byIndex=p,e.splice(p,0,{identifier:c,updater:h,references:1})}o.push(c)}return o}t.exports=function(t,n){var o=r(t=t||[],n=n||{});return function(t){t=t||[];for(var p=0;p<o.length;p++){var a=i(o[p]);e[a].references--}for(var l=r(t,n),s=0;s<o.length;s++){var c=i(o[s]);0===e[c].references&&(e[c].updater(),e.splice(c,1))}o=l}}},659(t){var e={};t.exports=function(t,i){var r=function(t){if(void 0===e[t]){var i=document.querySelector(t);if(window.HTMLIFrameElement&&i instanceof window.HTMLIFrameElement)try{i=i.contentDocument.head}catch(t){i=null}e[t]=i}return e[t]}(t);if(!r)throw Error("Couldn't find a style target. This probably means that the value for the 'insert' parameter is invalid.");r.appendChild(i)}},540(t){t.exports=function(t){var e=document.createElement("style");return t.setAttributes(e,t.attributes),t.insert(e,t.options),e}},56(t,e,i){t.exports=function(t){var e=i.nc;e&&t.setAttribute("nonce",e)}},825(t){t.exports=function(t){if("u"<typeof document)return{update:function(){},remove:function(){}};var e=t.insertStyleElement(t);return{update:function(i){var r,n,o;r="",i.supports&&(r+="@supports (".concat(i.supports,") {")),i.media&&(r+="@media ".concat(i.media," {")),(n=void 0!==i.layer)&&(r+="@layer".concat(i.layer.length>0?" ".concat(i.layer):""," {")),r+=i.css,n&&(r+="}"),i.media&&(r+="}"),i.supports&&(r+="}"),(o=i.sourceMap)&&"u">typeof btoa&&(r+="\n/*# sourceMappingURL=data:application/json;base64,".concat(btoa(unescape(encodeURIComponent(JSON.stringify(o))))," */")),t.styleTagTransform(r,e,t.options)},remove:function(){var t;null===(t=e).parentNode||t.parentNode.removeChild(t)}}}},113(t){t.exports=function(t,e){if(e.styleSheet)e.styleSheet.cssText=t;else{for(;e.firstChild;)e.removeChild(e.firstChild);e.appendChild(document.createTextNode(t))}}},959(t,e,i){var r=i(72),n=i.n(r),o=i(825),p=i.n(o),a=i(659),l=i.n(a),s=i(56),c=i.n(s),d=i(540),u=i.n(d),h=i(113),f=i.n(h),v=i(646),m={};m.styleTagTransform=f(),m.setAttributes=c(),m.insert=l().bind(null,"head"),m.domAPI=p(),m.insertStyleElement=u(),n()(v.A,m),v.A&&v.A.locals&&v.A.locals}}]);